#include "lab/hop_breakdown.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

namespace aggvm::lab {
namespace {

constexpr std::array<std::string_view, kHopCount> kHopNames = {
    "raised->local_controller",      "local_controller->master_received", "master_received->master_decided",
    "master_decided->target_received", "target_received->injected",       "injected->guest_handler",
    "end_to_end",
};

absl::Status Invalid(const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(fmt::format("hop breakdown: field '{}' {}", field, why));
}

}  // namespace

std::string_view HopName(Hop h) { return kHopNames[static_cast<size_t>(h)]; }

std::optional<Hop> HopFromName(std::string_view name) {
  for (size_t i = 0; i < kHopCount; ++i) {
    if (kHopNames[i] == name) return static_cast<Hop>(i);
  }
  return std::nullopt;
}

HopBreakdown::HopBreakdown() : HopBreakdown(LatencyHistogram()) {}

HopBreakdown::HopBreakdown(const LatencyHistogram& prototype) {
  for (auto& h : hops_) h.histogram = prototype;
}

absl::StatusOr<HopBreakdown> HopBreakdown::Create(const HistogramOptions& options) {
  auto h = LatencyHistogram::Create(options);
  if (!h.ok()) return h.status();
  return HopBreakdown(*h);
}

void HopBreakdown::AddHop(Hop h, uint64_t from, uint64_t to) {
  HopStats& s = hops_[static_cast<size_t>(h)];
  if (from == 0 || to == 0) {
    ++s.missing;
  } else if (to < from) {
    ++s.clock_anomalies;
  } else {
    s.histogram.Record(to - from);
  }
}

void HopBreakdown::Add(const transport::TraceBlock& t, uint64_t guest_handler_ns) {
  const std::array<uint64_t, kPathHopCount + 1> stamps = {
      t.raised, t.local_controller, t.master_received, t.master_decided, t.target_received, t.injected,
      guest_handler_ns};
  ++samples_;
  bool anomalous = false;
  uint64_t latest = 0;  // the largest non-zero stamp seen so far along the path
  for (size_t i = 0; i < stamps.size(); ++i) {
    if (i + 1 < stamps.size()) AddHop(static_cast<Hop>(i), stamps[i], stamps[i + 1]);
    if (stamps[i] != 0) {
      if (stamps[i] < latest) anomalous = true;
      latest = std::max(latest, stamps[i]);
    }
  }
  AddHop(Hop::kEndToEnd, t.raised, guest_handler_ns != 0 ? guest_handler_ns : t.injected);
  if (anomalous) ++anomalous_samples_;
}

absl::Status HopBreakdown::Merge(const HopBreakdown& other) {
  if (!(options() == other.options())) {
    return absl::InvalidArgumentError("cannot merge hop breakdowns with different histogram options");
  }
  for (size_t i = 0; i < kHopCount; ++i) {
    if (auto s = hops_[i].histogram.Merge(other.hops_[i].histogram); !s.ok()) return s;
    hops_[i].missing += other.hops_[i].missing;
    hops_[i].clock_anomalies += other.hops_[i].clock_anomalies;
  }
  samples_ += other.samples_;
  anomalous_samples_ += other.anomalous_samples_;
  return absl::OkStatus();
}

nlohmann::json HopBreakdown::ToJson() const {
  nlohmann::json hops = nlohmann::json::array();
  for (size_t i = 0; i < kHopCount; ++i) {
    hops.push_back({{"hop", kHopNames[i]},
                    {"missing", hops_[i].missing},
                    {"clock_anomalies", hops_[i].clock_anomalies},
                    {"histogram", hops_[i].histogram.ToJson()}});
  }
  return {{"samples", samples_}, {"anomalous_samples", anomalous_samples_}, {"hops", std::move(hops)}};
}

absl::StatusOr<HopBreakdown> HopBreakdown::FromJson(const nlohmann::json& j) {
  if (!j.is_object()) return Invalid("(top)", "must be an object");
  auto unsigned_field = [](const nlohmann::json& o, const char* name, const std::string& where,
                           uint64_t& out) -> absl::Status {
    auto it = o.find(name);
    if (it == o.end() || !it->is_number_unsigned()) {
      return Invalid(where + name, "must be a non-negative integer");
    }
    out = it->get<uint64_t>();
    return absl::OkStatus();
  };
  HopBreakdown b;
  if (auto s = unsigned_field(j, "samples", "", b.samples_); !s.ok()) return s;
  if (auto s = unsigned_field(j, "anomalous_samples", "", b.anomalous_samples_); !s.ok()) return s;
  if (!j.contains("hops")) return Invalid("hops", "is missing");
  const nlohmann::json& hops = j.at("hops");
  if (!hops.is_array() || hops.size() != kHopCount) {
    return Invalid("hops", fmt::format("must be an array of the {} hops", kHopCount));
  }
  std::array<bool, kHopCount> seen{};
  size_t k = 0;
  for (const auto& e : hops) {
    const std::string where = fmt::format("hops[{}].", k);
    if (!e.is_object()) return Invalid(where, "must be an object");
    auto name = e.find("hop");
    if (name == e.end() || !name->is_string()) return Invalid(where + "hop", "must be a hop name");
    auto hop = HopFromName(name->get<std::string>());
    if (!hop) return Invalid(where + "hop", fmt::format("unknown hop {}", name->dump()));
    const auto i = static_cast<size_t>(*hop);
    if (seen[i]) return Invalid(where + "hop", fmt::format("hop {} appears twice", name->dump()));
    seen[i] = true;
    HopStats& s = b.hops_[i];
    if (auto st = unsigned_field(e, "missing", where, s.missing); !st.ok()) return st;
    if (auto st = unsigned_field(e, "clock_anomalies", where, s.clock_anomalies); !st.ok()) return st;
    auto hist = e.find("histogram");
    if (hist == e.end()) return Invalid(where + "histogram", "is missing");
    auto h = LatencyHistogram::FromJson(*hist);
    if (!h.ok()) return Invalid(where + "histogram", std::string(h.status().message()));
    s.histogram = std::move(*h);
    ++k;
  }
  for (size_t i = 1; i < kHopCount; ++i) {
    if (!(b.hops_[i].histogram.options() == b.hops_[0].histogram.options())) {
      return Invalid("hops", "every hop's histogram must use the same options");
    }
  }
  return b;
}

}  // namespace aggvm::lab
