// Test helpers for the Prometheus endpoints: an HTTP GET over a plain socket and a parser of the text exposition
// format (version 0.0.4) into "name{label="value",...}" -> value.
#pragma once

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <map>
#include <sstream>
#include <string>

#include "absl/status/statusor.h"

namespace aggvm::testing {

/// GET http://host:port/metrics, the body.
inline absl::StatusOr<std::string> HttpGetMetrics(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0 || res == nullptr) {
    return absl::UnavailableError("cannot resolve " + host);
  }
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  const bool connected = fd >= 0 && ::connect(fd, res->ai_addr, res->ai_addrlen) == 0;
  ::freeaddrinfo(res);
  if (!connected) {
    if (fd >= 0) ::close(fd);
    return absl::UnavailableError("cannot connect to " + host + ":" + std::to_string(port));
  }
  const std::string req = "GET /metrics HTTP/1.0\r\nHost: " + host + "\r\n\r\n";
  if (::send(fd, req.data(), req.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(req.size())) {
    ::close(fd);
    return absl::UnavailableError("send failed");
  }
  std::string resp;
  char buf[4096];
  for (ssize_t n; (n = ::recv(fd, buf, sizeof buf, 0)) > 0;) resp.append(buf, static_cast<size_t>(n));
  ::close(fd);
  if (resp.rfind("HTTP/1.", 0) != 0 || resp.find(" 200 ") == std::string::npos) {
    return absl::InternalError("not an HTTP 200 answer: " + resp.substr(0, 80));
  }
  const auto body = resp.find("\r\n\r\n");
  if (body == std::string::npos) return absl::InternalError("no HTTP body");
  return resp.substr(body + 4);
}

/// The samples of a text exposition: "# HELP"/"# TYPE" lines skipped, each other line "series value".
/// INVALID_ARGUMENT for a line that does not parse (the test then fails with it).
inline absl::StatusOr<std::map<std::string, double>> ParseExposition(const std::string& text) {
  std::map<std::string, double> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    // The value follows the last space outside the label block.
    const auto close = line.rfind('}');
    const auto space = line.find(' ', close == std::string::npos ? 0 : close);
    if (space == std::string::npos) return absl::InvalidArgumentError("no value in line: " + line);
    char* end = nullptr;
    const std::string value = line.substr(space + 1);
    const double v = std::strtod(value.c_str(), &end);
    if (end == value.c_str()) return absl::InvalidArgumentError("bad value in line: " + line);
    out[line.substr(0, space)] = v;
  }
  return out;
}

/// The sum of every series of metric `name` whose labels contain all of `must` (each like `node="node-b"`).
inline double Sum(const std::map<std::string, double>& samples, const std::string& name,
                  std::initializer_list<std::string> must = {}) {
  double total = 0;
  for (const auto& [series, v] : samples) {
    const auto brace = series.find('{');
    if (series.substr(0, brace) != name) continue;
    bool ok = true;
    for (const auto& m : must) ok = ok && series.find(m) != std::string::npos;
    if (ok) total += v;
  }
  return total;
}

}  // namespace aggvm::testing
