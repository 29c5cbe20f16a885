#include "lab/table.h"

#include <fmt/format.h>

namespace aggvm::lab {
namespace {

std::string Micros(uint64_t ns) { return fmt::format("{:.2f}", static_cast<double>(ns) / 1000.0); }

}  // namespace

std::string FormatTable(const ExperimentResult& r) {
  std::string out = fmt::format("experiment {}  (aggvm {})\nmachine {}: {} x {}, tsc {} kHz, kernel {}\n", r.name,
                                r.software_version, r.machine.hostname, r.machine.cores, r.machine.cpu_model,
                                r.machine.tsc_khz, r.machine.kernel);
  if (!r.cluster.empty()) out += fmt::format("cluster {}\n", r.cluster);
  for (const auto& c : r.clocks) {
    out += c.error.empty() ? fmt::format("clock {} at {}: offset {:+.1f} us +- {:.1f} us (min RTT {:.1f} us, {} probes)\n",
                                         c.node, c.phase, c.offset_ns / 1e3, c.uncertainty_ns / 1e3,
                                         static_cast<double>(c.rtt_min_ns) / 1e3, c.samples)
                           : fmt::format("clock {} at {}: {}\n", c.node, c.phase, c.error);
  }
  constexpr std::string_view kRow = "  {:<36} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9}\n";
  for (const auto& c : r.configurations) {
    out += fmt::format("\nconfiguration {}  ({} samples, {} with clock anomalies)\n", c.Label(), c.hops.samples(),
                       c.hops.anomalous_samples());
    if (c.status != "ok") out += fmt::format("  {}\n", c.status);
    for (const auto& [k, v] : c.measurements) out += fmt::format("  {} = {:.6g}\n", k, v);
    if (c.status != "ok" && c.hops.samples() == 0) continue;
    out += fmt::format(kRow, "hop (latency in us)", "count", "min", "p50", "p90", "p99", "p99.9", "max", "missing",
                       "anomalies");
    for (size_t i = 0; i < kHopCount; ++i) {
      const auto hop = static_cast<Hop>(i);
      const HopStats& s = c.hops.hop(hop);
      const LatencyHistogram& h = s.histogram;
      if (h.count() == 0) {
        out += fmt::format(kRow, HopName(hop), 0, "-", "-", "-", "-", "-", "-", s.missing, s.clock_anomalies);
        continue;
      }
      out += fmt::format(kRow, HopName(hop), h.count(), Micros(h.min()), Micros(h.Percentile(50)),
                         Micros(h.Percentile(90)), Micros(h.Percentile(99)), Micros(h.Percentile(99.9)),
                         Micros(h.max()), s.missing, s.clock_anomalies);
    }
  }
  return out;
}

}  // namespace aggvm::lab
