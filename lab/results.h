// The results of one latency experiment: what was run (configuration key/values), with which software on which
// machine, and per configuration the per-hop breakdown. Written as JSON (the file researchers keep and the plot
// command reads) and CSV (one row per configuration and hop); JSON is read back with full validation, and
// JSON -> ExperimentResult -> JSON is the identity for files this code wrote.
#pragma once

#include <map>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "lab/hop_breakdown.h"

namespace aggvm::lab {

inline constexpr int kResultsFormatVersion = 1;
/// ExperimentResult::FromJson refuses files whose histograms would need more memory than this.
inline constexpr size_t kMaxHistogramMemory = size_t{512} << 20;

struct MachineInfo {
  std::string hostname;
  std::string kernel;     // uname -r (release) and -v (version)
  std::string cpu_model;  // /proc/cpuinfo "model name"
  uint32_t cores = 0;     // online logical CPUs
  uint64_t tsc_khz = 0;   // measured against CLOCK_MONOTONIC (0 if the TSC is unusable)

  /// Reads this machine (uname, /proc/cpuinfo, sysconf) and calibrates the TSC over ~`calibration_ms`.
  static MachineInfo Collect(int calibration_ms = 50);
  bool operator==(const MachineInfo&) const = default;
};

/// `git describe --always --dirty` of the source tree, fixed when the lab library was configured.
std::string_view SoftwareVersion();

struct ConfigurationResult {
  std::map<std::string, std::string> config;  // e.g. transport=tcp, wait=busy-poll, route=via-master
  HopBreakdown hops;
  /// "ok", or why the configuration produced no (or partial) data, e.g. "skipped: no RDMA device on node-a ...".
  std::string status = "ok";
  /// Other numbers of the run, by name (samples_lost, rate_hz, trace_on_p50_ns, ...). Optional in files.
  std::map<std::string, double> measurements;

  /// "k1=v1,k2=v2" in key order: the configuration's label in tables, CSV and plots ("default" when empty).
  std::string Label() const;
  bool operator==(const ConfigurationResult&) const = default;
};

/// One node's clock offset against the master's CLOCK_MONOTONIC (RTT/2 method, lab/clock_offset.h).
struct ClockRecord {
  std::string node;
  std::string phase;          // "start" or "end" of the run
  double offset_ns = 0;       // node - master
  double uncertainty_ns = 0;  // +- (RTT_min / 2)
  uint64_t rtt_min_ns = 0;
  uint32_t samples = 0;
  std::string error;          // the node did not answer
  bool operator==(const ClockRecord&) const = default;
};

struct ExperimentResult {
  std::string name;
  std::string software_version;
  MachineInfo machine;
  std::vector<ConfigurationResult> configurations;
  /// Where it ran ("local: master + 2 agents in network namespaces", "cluster at host:port"). Optional in files.
  std::string cluster;
  /// The experiment definition as run (compact JSON text; "" = not recorded). Written as a JSON object.
  std::string experiment_json;
  /// Clock offsets of the nodes at the start and the end of the run. Optional in files.
  std::vector<ClockRecord> clocks;

  nlohmann::json ToJson() const;
  std::string ToJsonString() const;  // pretty-printed, newline-terminated
  /// INVALID_ARGUMENT naming the field for anything malformed (including a format_version this code does not know,
  /// or histograms needing more than kMaxHistogramMemory in total).
  static absl::StatusOr<ExperimentResult> FromJson(const nlohmann::json& j);
  static absl::StatusOr<ExperimentResult> FromJsonString(std::string_view text);

  /// Header "experiment,configuration,hop,count,min,p50,p90,p99,p999,max,mean,missing,clock_anomalies" then one row
  /// per (configuration, hop); latencies in ns. Fields are quoted per RFC 4180 when needed.
  std::string ToCsv() const;

  bool operator==(const ExperimentResult&) const = default;
};

absl::Status WriteFile(const std::string& path, std::string_view contents);
absl::StatusOr<std::string> ReadFile(const std::string& path);

}  // namespace aggvm::lab
