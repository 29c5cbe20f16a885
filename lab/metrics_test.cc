#include "lab/metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <sstream>
#include <thread>

namespace aggvm::lab {
namespace {

// One sample of the text exposition format: name, labels, value.
struct Series {
  std::string name;
  std::map<std::string, std::string> labels;
  bool operator<(const Series& o) const { return std::tie(name, labels) < std::tie(o.name, o.labels); }
};

// Parses the Prometheus text format 0.0.4 (https://prometheus.io/docs/instrumenting/exposition_formats/): comment
// lines, then `name{k="v",...} value [timestamp]`. Fails the test on a malformed line.
std::map<Series, double> ParseExposition(const std::string& text) {
  std::map<Series, double> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    Series s;
    size_t i = line.find_first_of("{ ");
    EXPECT_NE(i, std::string::npos) << line;
    if (i == std::string::npos) continue;
    s.name = line.substr(0, i);
    if (line[i] == '{') {
      ++i;
      while (i < line.size() && line[i] != '}') {
        const size_t eq = line.find("=\"", i);
        EXPECT_NE(eq, std::string::npos) << line;
        if (eq == std::string::npos) return out;
        const std::string key = line.substr(i, eq - i);
        std::string value;
        size_t j = eq + 2;
        for (; j < line.size() && line[j] != '"'; ++j) {
          if (line[j] == '\\' && j + 1 < line.size()) ++j;
          value += line[j];
        }
        s.labels[key] = value;
        i = j + 1;
        if (i < line.size() && line[i] == ',') ++i;
      }
      i += 2;  // "} "
    } else {
      i += 1;
    }
    EXPECT_LT(i, line.size()) << line;
    if (i >= line.size()) continue;
    std::string value = line.substr(i);
    value = value.substr(0, value.find(' '));
    out[s] = value == "+Inf" ? INFINITY : std::stod(value);
  }
  return out;
}

// A real HTTP GET over a TCP socket. Returns the body.
std::string HttpGet(uint16_t port, const std::string& path) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  EXPECT_GE(fd, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0) << std::strerror(errno);
  const std::string req = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  EXPECT_EQ(::send(fd, req.data(), req.size(), MSG_NOSIGNAL), static_cast<ssize_t>(req.size()));
  std::string resp;
  char buf[4096];
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 1000) <= 0) continue;
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    resp.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  EXPECT_EQ(resp.rfind("HTTP/1.", 0), 0u) << resp;
  EXPECT_NE(resp.find(" 200 "), std::string::npos) << resp.substr(0, 200);
  const size_t body = resp.find("\r\n\r\n");
  return body == std::string::npos ? "" : resp.substr(body + 4);
}

double Value(const std::map<Series, double>& m, const std::string& name, std::map<std::string, std::string> labels) {
  auto it = m.find(Series{name, std::move(labels)});
  return it == m.end() ? -1 : it->second;
}

// The cumulative count of the histogram bucket whose upper bound `le` is `bound` (compared as numbers).
double Bucket(const std::map<Series, double>& m, const std::string& name, double bound) {
  for (const auto& [series, value] : m) {
    if (series.name != name + "_bucket") continue;
    auto le = series.labels.find("le");
    if (le == series.labels.end()) continue;
    const double b = le->second == "+Inf" ? INFINITY : std::stod(le->second);
    if (b == bound || std::abs(b - bound) <= 1e-12 * bound) return value;
  }
  return -1;
}

TEST(Metrics, ScrapeOverHttpShowsCountersAndHistogramsMoving) {
  MetricsRegistry registry;
  auto raised = registry.Counter("aggvm_interrupts_raised_total", "Interrupts raised", {{"node", "1"}});
  auto dropped_full = registry.Counter("aggvm_interrupts_dropped_total", "Interrupts dropped", {{"reason", "full"}});
  auto dropped_bad = registry.Counter("aggvm_interrupts_dropped_total", "Interrupts dropped", {{"reason", "bad"}});
  auto e2e = registry.LatencyHistogram("aggvm_hop_latency_seconds", "Per-hop latency", {{"hop", "end_to_end"}});
  ASSERT_TRUE(raised.ok() && dropped_full.ok() && dropped_bad.ok() && e2e.ok());

  auto endpoint = MetricsEndpoint::Start(registry, "127.0.0.1:0");
  ASSERT_TRUE(endpoint.ok()) << endpoint.status();
  ASSERT_GT((*endpoint)->port(), 0);

  auto before = ParseExposition(HttpGet((*endpoint)->port(), "/metrics"));
  EXPECT_EQ(Value(before, "aggvm_interrupts_raised_total", {{"node", "1"}}), 0);
  EXPECT_EQ(Value(before, "aggvm_hop_latency_seconds_count", {{"hop", "end_to_end"}}), 0);

  // Increments from several threads, as pollers would.
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 10'000; ++i) raised->Increment();
    });
  }
  for (auto& t : threads) t.join();
  dropped_bad->Increment(3);
  e2e->ObserveNanos(1'500);      // 1.5 µs: in the 2 µs bucket
  e2e->ObserveNanos(70'000);     // 70 µs: in the 100 µs bucket
  e2e->ObserveNanos(5'000'000'000);  // 5 s: only +Inf

  auto after = ParseExposition(HttpGet((*endpoint)->port(), "/metrics"));
  EXPECT_EQ(Value(after, "aggvm_interrupts_raised_total", {{"node", "1"}}), 40'000);
  EXPECT_EQ(Value(after, "aggvm_interrupts_dropped_total", {{"reason", "bad"}}), 3);
  EXPECT_EQ(Value(after, "aggvm_interrupts_dropped_total", {{"reason", "full"}}), 0);
  EXPECT_EQ(Value(after, "aggvm_hop_latency_seconds_count", {{"hop", "end_to_end"}}), 3);
  EXPECT_NEAR(Value(after, "aggvm_hop_latency_seconds_sum", {{"hop", "end_to_end"}}), 5.0000715, 1e-9);
  EXPECT_EQ(Bucket(after, "aggvm_hop_latency_seconds", 1e-6), 0);
  EXPECT_EQ(Bucket(after, "aggvm_hop_latency_seconds", 2e-6), 1);
  EXPECT_EQ(Bucket(after, "aggvm_hop_latency_seconds", 1e-4), 2);
  EXPECT_EQ(Bucket(after, "aggvm_hop_latency_seconds", INFINITY), 3);
  // The text the registry renders itself parses to the same values.
  auto local = ParseExposition(registry.TextExposition());
  EXPECT_EQ(Value(local, "aggvm_interrupts_raised_total", {{"node", "1"}}), 40'000);
}

TEST(Metrics, SameNameAndLabelsGiveTheSameSeries) {
  MetricsRegistry registry;
  auto a = registry.Counter("aggvm_frames_sent_total", "Frames sent", {{"peer", "2"}});
  auto b = registry.Counter("aggvm_frames_sent_total", "Frames sent", {{"peer", "2"}});
  ASSERT_TRUE(a.ok() && b.ok());
  a->Increment(5);
  EXPECT_EQ(b->value(), 5);
}

TEST(Metrics, ConflictsAndBadNamesAreErrors) {
  MetricsRegistry registry;
  ASSERT_TRUE(registry.Counter("aggvm_x_total", "x").ok());
  EXPECT_EQ(registry.LatencyHistogram("aggvm_x_total", "x").status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(registry.Counter("aggvm_x_total", "other help").status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(registry.Counter("0bad name", "x").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.Counter("aggvm_y_total", "y", {{"bad label", "v"}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  const uint64_t unsorted[] = {10, 5};
  EXPECT_EQ(registry.LatencyHistogram("aggvm_h_seconds", "h", {}, unsorted).status().code(),
            absl::StatusCode::kInvalidArgument);
  const uint64_t one[] = {10}, two[] = {10, 20};
  ASSERT_TRUE(registry.LatencyHistogram("aggvm_h_seconds", "h", {}, one).ok());
  EXPECT_EQ(registry.LatencyHistogram("aggvm_h_seconds", "h", {}, two).status().code(),
            absl::StatusCode::kAlreadyExists);
}

TEST(Metrics, EndpointOnABusyPortIsUnavailable) {
  MetricsRegistry registry;
  auto first = MetricsEndpoint::Start(registry, "127.0.0.1:0");
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = MetricsEndpoint::Start(registry, "127.0.0.1:" + std::to_string((*first)->port()));
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(second.status().message().find(std::to_string((*first)->port())), std::string_view::npos);
}

}  // namespace
}  // namespace aggvm::lab
