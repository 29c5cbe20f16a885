#include "lab/runner/experiment.h"

#include <algorithm>
#include <cmath>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "transport/frame.h"

namespace aggvm::lab::runner {
namespace {

absl::Status Invalid(const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(fmt::format("experiment: field '{}' {}", field, why));
}

const std::set<std::string> kWorkloads = {"doorbell", "storm", "ipi-pingpong", "ipi-broadcast"};
const std::set<std::string> kBroadcastDests = {"all-excluding-self", "all-including-self", "physical-broadcast"};
const std::set<std::string> kTransports = {"tcp-busy-poll", "tcp-epoll", "rdma"};
const std::set<std::string> kIrqchips = {"kernel", "user"};
const std::set<std::string> kRouteModes = {"via-master", "direct"};
const std::set<std::string> kPolicies = {"sdm", "round-robin", "node-local-first"};

std::string Join(const std::set<std::string>& s) {
  std::string out;
  for (const auto& v : s) out += (out.empty() ? "" : ", ") + v;
  return out;
}

absl::Status GetUint(const nlohmann::json& o, const char* key, const std::string& where, uint32_t lo, uint32_t hi,
                     uint32_t& out) {
  auto it = o.find(key);
  if (it == o.end()) return absl::OkStatus();
  if (!it->is_number_integer() || it->get<int64_t>() < lo || it->get<int64_t>() > hi) {
    return Invalid(where + key, fmt::format("must be an integer in {}..{}", lo, hi));
  }
  out = it->get<uint32_t>();
  return absl::OkStatus();
}

absl::Status GetDouble(const nlohmann::json& o, const char* key, const std::string& where, double lo, double hi,
                       double& out) {
  auto it = o.find(key);
  if (it == o.end()) return absl::OkStatus();
  if (!it->is_number() || it->get<double>() < lo || it->get<double>() > hi) {
    return Invalid(where + key, fmt::format("must be a number in {}..{}", lo, hi));
  }
  out = it->get<double>();
  return absl::OkStatus();
}

absl::Status GetAxis(const nlohmann::json& m, const char* key, const std::set<std::string>& allowed,
                     std::vector<std::string>& out) {
  auto it = m.find(key);
  if (it == m.end()) return absl::OkStatus();
  const std::string where = std::string("matrix.") + key;
  if (!it->is_array() || it->empty()) return Invalid(where, "must be a non-empty array of strings");
  std::vector<std::string> values;
  for (const auto& v : *it) {
    if (!v.is_string() || !allowed.contains(v.get<std::string>())) {
      return Invalid(where, fmt::format("has {}; allowed: {}", v.dump(), Join(allowed)));
    }
    if (std::find(values.begin(), values.end(), v.get<std::string>()) != values.end()) {
      return Invalid(where, fmt::format("lists {} twice", v.dump()));
    }
    values.push_back(v.get<std::string>());
  }
  out = std::move(values);
  return absl::OkStatus();
}

absl::Status OnlyKeys(const nlohmann::json& o, const std::string& where, const std::set<std::string>& keys) {
  for (const auto& [k, v] : o.items()) {
    if (!keys.contains(k)) return Invalid(where + k, fmt::format("is not known (known: {})", Join(keys)));
  }
  return absl::OkStatus();
}

}  // namespace

std::map<std::string, std::string> Configuration::Labels() const {
  return {{"workload", workload}, {"transport", transport}, {"irqchip", irqchip}, {"route_mode", route_mode},
          {"routing_policy", routing_policy}};
}

absl::StatusOr<Experiment> Experiment::FromJson(const nlohmann::json& j) {
  if (!j.is_object()) return Invalid("(top)", "must be an object");
  if (auto s = OnlyKeys(j, "", {"name", "workload", "samples", "warmup", "max_seconds", "storm", "trace_cost",
                                "trace_cost_control", "pace_us", "broadcast_dest", "nodes", "clock_samples", "matrix"});
      !s.ok()) {
    return s;
  }
  Experiment e;
  auto name = j.find("name");
  if (name == j.end() || !name->is_string() || name->get<std::string>().empty()) {
    return Invalid("name", "must be a non-empty string");
  }
  e.name = name->get<std::string>();
  if (auto w = j.find("workload"); w != j.end()) {
    if (!w->is_string() || !kWorkloads.contains(w->get<std::string>())) {
      return Invalid("workload", fmt::format("is {}; allowed: {}", w->dump(), Join(kWorkloads)));
    }
    e.workload = w->get<std::string>();
  }
  for (auto s : {GetUint(j, "samples", "", 1, 1'000'000, e.samples), GetUint(j, "warmup", "", 0, 100'000, e.warmup),
                 GetUint(j, "nodes", "", 2, 8, e.nodes), GetUint(j, "clock_samples", "", 1, 1000, e.clock_samples),
                 GetDouble(j, "max_seconds", "", 1, 86400, e.max_seconds),
                 GetDouble(j, "pace_us", "", 0, 1e6, e.pace_us)}) {
    if (!s.ok()) return s;
  }
  if (auto t = j.find("trace_cost"); t != j.end()) {
    if (!t->is_boolean()) return Invalid("trace_cost", "must be true or false");
    e.trace_cost = t->get<bool>();
  }
  if (auto t = j.find("trace_cost_control"); t != j.end()) {
    if (!t->is_boolean()) return Invalid("trace_cost_control", "must be true or false");
    e.trace_cost_control = t->get<bool>();
  }
  if (auto b = j.find("broadcast_dest"); b != j.end()) {
    if (!b->is_string() || !kBroadcastDests.contains(b->get<std::string>())) {
      return Invalid("broadcast_dest", fmt::format("is {}; allowed: {}", b->dump(), Join(kBroadcastDests)));
    }
    e.broadcast_dest = b->get<std::string>();
  }
  if (auto st = j.find("storm"); st != j.end()) {
    if (!st->is_object()) return Invalid("storm", "must be an object");
    if (auto s = OnlyKeys(*st, "storm.", {"rate_hz", "seconds"}); !s.ok()) return s;
    // One train of edges raised by the node (transport/frame.h: interval >= 10 µs, at most 10^6 edges, 600 s).
    for (auto s : {GetDouble(*st, "rate_hz", "storm.", 1, 100'000, e.storm_rate_hz),
                   GetDouble(*st, "seconds", "storm.", 0.01, 600, e.storm_seconds)}) {
      if (!s.ok()) return s;
    }
    // Checked on the values the runner sends: the rounded interval and count.
    const double interval_us = std::round(1e6 / e.storm_rate_hz), count = std::round(e.storm_rate_hz * e.storm_seconds);
    if (const std::string_view why = transport::ControlPayload::TrainProblem(
            static_cast<uint32_t>(count), static_cast<uint32_t>(interval_us));  // both far below 2^32 here
        !why.empty()) {
      return Invalid("storm.seconds",
                     fmt::format("{} edges {} µs apart (rate_hz x seconds): {}", count, interval_us, why));
    }
  }
  if (auto m = j.find("matrix"); m != j.end()) {
    if (!m->is_object()) return Invalid("matrix", "must be an object");
    if (auto s = OnlyKeys(*m, "matrix.", {"transport", "irqchip", "route_mode", "routing_policy"}); !s.ok()) return s;
    for (auto s : {GetAxis(*m, "transport", kTransports, e.transports), GetAxis(*m, "irqchip", kIrqchips, e.irqchips),
                   GetAxis(*m, "route_mode", kRouteModes, e.route_modes),
                   GetAxis(*m, "routing_policy", kPolicies, e.routing_policies)}) {
      if (!s.ok()) return s;
    }
  }
  if (e.trace_cost && e.workload != "doorbell") return Invalid("trace_cost", "needs workload \"doorbell\"");
  if (e.trace_cost_control && !e.trace_cost) return Invalid("trace_cost_control", "needs \"trace_cost\": true");
  if (e.pace_us > 0 && e.workload != "doorbell") return Invalid("pace_us", "needs workload \"doorbell\"");
  return e;
}

absl::StatusOr<Experiment> Experiment::FromJsonString(std::string_view text) {
  auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false, /*ignore_comments=*/true);
  if (j.is_discarded()) return absl::InvalidArgumentError("experiment: not valid JSON");
  return FromJson(j);
}

nlohmann::json Experiment::ToJson() const {
  return {{"name", name},
          {"workload", workload},
          {"samples", samples},
          {"warmup", warmup},
          {"max_seconds", max_seconds},
          {"storm", {{"rate_hz", storm_rate_hz}, {"seconds", storm_seconds}}},
          {"trace_cost", trace_cost},
          {"trace_cost_control", trace_cost_control},
          {"pace_us", pace_us},
          {"broadcast_dest", broadcast_dest},
          {"nodes", nodes},
          {"clock_samples", clock_samples},
          {"matrix",
           {{"transport", transports},
            {"irqchip", irqchips},
            {"route_mode", route_modes},
            {"routing_policy", routing_policies}}}};
}

std::vector<Configuration> Experiment::Expand() const {
  std::vector<Configuration> out;
  for (const auto& t : transports) {
    for (const auto& i : irqchips) {
      for (const auto& r : route_modes) {
        for (const auto& p : routing_policies) out.push_back({workload, t, i, r, p});
      }
    }
  }
  return out;
}

}  // namespace aggvm::lab::runner
