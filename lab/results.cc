#include "lab/results.h"

#include <sys/utsname.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/clock.h"

#ifndef AGGVM_LAB_SOFTWARE_VERSION
#define AGGVM_LAB_SOFTWARE_VERSION "unknown"
#endif

namespace aggvm::lab {
namespace {

absl::Status Invalid(const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(fmt::format("experiment result: field '{}' {}", field, why));
}

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) {
        auto v = line.substr(colon + 1);
        v.erase(0, v.find_first_not_of(" \t"));
        return v;
      }
    }
  }
  return "unknown";
}

uint64_t CalibrateTscKhz(int ms) {
  if (ms <= 0) return 0;
  const uint64_t t0 = MonotonicNanos();
  const uint64_t c0 = ReadTsc();
  const uint64_t target = t0 + static_cast<uint64_t>(ms) * 1'000'000;
  uint64_t t1 = t0;
  while (t1 < target) t1 = MonotonicNanos();
  const uint64_t c1 = ReadTsc();
  if (c1 <= c0 || t1 <= t0) return 0;
  // kHz = cycles per ms; round to the nearest kHz.
  return static_cast<uint64_t>(static_cast<double>(c1 - c0) * 1e6 / static_cast<double>(t1 - t0) + 0.5);
}

std::string CsvField(std::string_view s) {
  if (s.find_first_of(",\"\n\r") == std::string_view::npos) return std::string(s);
  std::string out = "\"";
  for (char c : s) {
    if (c == '"') out += '"';
    out += c;
  }
  out += '"';
  return out;
}

template <typename T>
absl::Status Get(const nlohmann::json& o, const char* name, const std::string& where, T& out) {
  auto it = o.find(name);
  if (it == o.end()) return Invalid(where + name, "is missing");
  if constexpr (std::is_same_v<T, std::string>) {
    if (!it->is_string()) return Invalid(where + name, "must be a string");
  } else if constexpr (std::is_floating_point_v<T>) {
    if (!it->is_number()) return Invalid(where + name, "must be a number");
  } else {
    if (!it->is_number_integer() || (!it->is_number_unsigned() && it->template get<int64_t>() < 0)) {
      return Invalid(where + name, "must be a non-negative integer");
    }
    if (it->get<uint64_t>() > std::numeric_limits<T>::max()) return Invalid(where + name, "is too large");
  }
  out = it->get<T>();
  return absl::OkStatus();
}

}  // namespace

MachineInfo MachineInfo::Collect(int calibration_ms) {
  MachineInfo m;
  utsname u{};
  if (::uname(&u) == 0) {
    m.hostname = u.nodename;
    m.kernel = fmt::format("{} {}", u.release, u.version);
  }
  m.cpu_model = CpuModel();
  const long n = ::sysconf(_SC_NPROCESSORS_ONLN);
  m.cores = n > 0 ? static_cast<uint32_t>(n) : 0;
  m.tsc_khz = CalibrateTscKhz(calibration_ms);
  return m;
}

std::string_view SoftwareVersion() { return AGGVM_LAB_SOFTWARE_VERSION; }

std::string ConfigurationResult::Label() const {
  if (config.empty()) return "default";
  std::string out;
  for (const auto& [k, v] : config) {
    if (!out.empty()) out += ',';
    out += k + "=" + v;
  }
  return out;
}

nlohmann::json ExperimentResult::ToJson() const {
  nlohmann::json configs = nlohmann::json::array();
  for (const auto& c : configurations) {
    configs.push_back({{"config", c.config},
                       {"label", c.Label()},
                       {"status", c.status},
                       {"measurements", c.measurements},
                       {"hops", c.hops.ToJson()}});
  }
  nlohmann::json clock_list = nlohmann::json::array();
  for (const auto& c : clocks) {
    clock_list.push_back({{"node", c.node}, {"phase", c.phase}, {"offset_ns", c.offset_ns},
                          {"uncertainty_ns", c.uncertainty_ns}, {"rtt_min_ns", c.rtt_min_ns},
                          {"samples", c.samples}, {"error", c.error}});
  }
  nlohmann::json experiment = nlohmann::json::object();
  if (!experiment_json.empty()) {
    experiment = nlohmann::json::parse(experiment_json, nullptr, /*allow_exceptions=*/false);
    if (experiment.is_discarded()) experiment = experiment_json;  // keep the text as it was
  }
  return {{"format_version", kResultsFormatVersion},
          {"cluster", cluster},
          {"experiment", std::move(experiment)},
          {"clocks", std::move(clock_list)},
          {"name", name},
          {"software_version", software_version},
          {"machine",
           {{"hostname", machine.hostname},
            {"kernel", machine.kernel},
            {"cpu_model", machine.cpu_model},
            {"cores", machine.cores},
            {"tsc_khz", machine.tsc_khz}}},
          {"configurations", std::move(configs)}};
}

std::string ExperimentResult::ToJsonString() const { return ToJson().dump(2) + "\n"; }

absl::StatusOr<ExperimentResult> ExperimentResult::FromJson(const nlohmann::json& j) {
  if (!j.is_object()) return Invalid("(top)", "must be an object");
  uint64_t version = 0;
  if (auto s = Get(j, "format_version", "", version); !s.ok()) return s;
  if (version != kResultsFormatVersion) {
    return Invalid("format_version", fmt::format("is {}; this build reads version {} (use a matching aggvm)",
                                                 version, kResultsFormatVersion));
  }
  ExperimentResult r;
  if (auto s = Get(j, "name", "", r.name); !s.ok()) return s;
  if (auto s = Get(j, "software_version", "", r.software_version); !s.ok()) return s;
  auto m = j.find("machine");
  if (m == j.end() || !m->is_object()) return Invalid("machine", "must be an object");
  for (auto s : {Get(*m, "hostname", "machine.", r.machine.hostname), Get(*m, "kernel", "machine.", r.machine.kernel),
                 Get(*m, "cpu_model", "machine.", r.machine.cpu_model), Get(*m, "cores", "machine.", r.machine.cores),
                 Get(*m, "tsc_khz", "machine.", r.machine.tsc_khz)}) {
    if (!s.ok()) return s;
  }
  if (j.contains("cluster")) {
    if (auto s = Get(j, "cluster", "", r.cluster); !s.ok()) return s;
  }
  if (auto e = j.find("experiment"); e != j.end()) {
    if (e->is_string()) r.experiment_json = e->get<std::string>();
    else if (e->is_object()) r.experiment_json = e->empty() ? "" : e->dump();
    else return Invalid("experiment", "must be an object");
  }
  if (auto cl = j.find("clocks"); cl != j.end()) {
    if (!cl->is_array()) return Invalid("clocks", "must be an array");
    for (size_t k = 0; k < cl->size(); ++k) {
      const auto& c = (*cl)[k];
      const std::string where = fmt::format("clocks[{}].", k);
      if (!c.is_object()) return Invalid(where, "must be an object");
      ClockRecord rec;
      for (auto s : {Get(c, "node", where, rec.node), Get(c, "phase", where, rec.phase),
                     Get(c, "offset_ns", where, rec.offset_ns), Get(c, "uncertainty_ns", where, rec.uncertainty_ns),
                     Get(c, "rtt_min_ns", where, rec.rtt_min_ns), Get(c, "samples", where, rec.samples),
                     Get(c, "error", where, rec.error)}) {
        if (!s.ok()) return s;
      }
      r.clocks.push_back(std::move(rec));
    }
  }
  auto configs = j.find("configurations");
  if (configs == j.end() || !configs->is_array()) return Invalid("configurations", "must be an array");
  size_t memory = 0;
  for (size_t k = 0; k < configs->size(); ++k) {
    const auto& c = (*configs)[k];
    const std::string where = fmt::format("configurations[{}].", k);
    if (!c.is_object()) return Invalid(where, "must be an object");
    ConfigurationResult cr;
    auto kv = c.find("config");
    if (kv == c.end() || !kv->is_object()) return Invalid(where + "config", "must be an object of strings");
    for (const auto& [key, value] : kv->items()) {
      if (!value.is_string()) return Invalid(where + "config." + key, "must be a string");
      cr.config[key] = value.get<std::string>();
    }
    std::string label;
    if (auto s = Get(c, "label", where, label); !s.ok()) return s;
    if (label != cr.Label()) {
      return Invalid(where + "label", fmt::format("'{}' does not match the config ('{}')", label, cr.Label()));
    }
    if (c.contains("status")) {
      if (auto s = Get(c, "status", where, cr.status); !s.ok()) return s;
    }
    if (auto ms = c.find("measurements"); ms != c.end()) {
      if (!ms->is_object()) return Invalid(where + "measurements", "must be an object of numbers");
      for (const auto& [key, value] : ms->items()) {
        if (!value.is_number()) return Invalid(where + "measurements." + key, "must be a number");
        cr.measurements[key] = value.get<double>();
      }
    }
    auto hops = c.find("hops");
    if (hops == c.end()) return Invalid(where + "hops", "is missing");
    auto b = HopBreakdown::FromJson(*hops);
    if (!b.ok()) return Invalid(where + "hops", std::string(b.status().message()));
    cr.hops = std::move(*b);
    // Histograms are dense in memory: bound what a file can make us allocate (a 1 KiB configuration can ask for
    // 7 x 3.8 MiB of buckets with 4 significant digits).
    memory += kHopCount * cr.hops.hop(Hop::kEndToEnd).histogram.bucket_count() * sizeof(uint64_t);
    if (memory > kMaxHistogramMemory) {
      return Invalid(where + "hops", fmt::format("the histograms of the first {} configurations need more than {} "
                                                 "MiB; split the results file or use fewer significant digits",
                                                 k + 1, kMaxHistogramMemory >> 20));
    }
    r.configurations.push_back(std::move(cr));
  }
  return r;
}

absl::StatusOr<ExperimentResult> ExperimentResult::FromJsonString(std::string_view text) {
  auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError("experiment result: not valid JSON");
  return FromJson(j);
}

std::string ExperimentResult::ToCsv() const {
  std::string out = "experiment,configuration,hop,count,min,p50,p90,p99,p999,max,mean,missing,clock_anomalies\n";
  for (const auto& c : configurations) {
    const std::string prefix = CsvField(name) + "," + CsvField(c.Label()) + ",";
    for (size_t i = 0; i < kHopCount; ++i) {
      const auto hop = static_cast<Hop>(i);
      const HopStats& s = c.hops.hop(hop);
      const LatencyHistogram& h = s.histogram;
      out += prefix + fmt::format("{},{},{},{},{},{},{},{},{:.1f},{},{}\n", HopName(hop), h.count(), h.min(),
                                  h.Percentile(50), h.Percentile(90), h.Percentile(99), h.Percentile(99.9), h.max(),
                                  h.mean(), s.missing, s.clock_anomalies);
    }
  }
  return out;
}

absl::Status WriteFile(const std::string& path, std::string_view contents) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::UnavailableError(fmt::format("cannot open {} for writing: {}", path, std::strerror(errno)));
  out.write(contents.data(), static_cast<std::streamsize>(contents.size()));
  out.close();
  if (!out) return absl::UnavailableError(fmt::format("cannot write {}: {}", path, std::strerror(errno)));
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(fmt::format("cannot open {}: {}", path, std::strerror(errno)));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace aggvm::lab
