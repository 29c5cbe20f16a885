#include "lab/results.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "lab/table.h"

namespace aggvm::lab {
namespace {

HopBreakdown Synthetic(uint64_t seed, uint64_t scale) {
  std::mt19937_64 rng(seed);
  std::lognormal_distribution<double> d(std::log(static_cast<double>(scale)), 0.5);
  HopBreakdown b;
  for (int i = 0; i < 2'000; ++i) {
    transport::TraceBlock t;
    t.trace_id = static_cast<uint32_t>(i);
    t.raised = 1'000'000'000 + static_cast<uint64_t>(i) * 10'000'000;
    t.local_controller = t.raised + static_cast<uint64_t>(d(rng));
    t.master_received = t.local_controller + static_cast<uint64_t>(d(rng));
    t.master_decided = t.master_received + static_cast<uint64_t>(d(rng));
    t.target_received = t.master_decided + static_cast<uint64_t>(d(rng));
    t.injected = t.target_received + static_cast<uint64_t>(d(rng));
    b.Add(t, i % 10 == 0 ? 0 : t.injected + static_cast<uint64_t>(d(rng)));
  }
  return b;
}

ExperimentResult Example() {
  ExperimentResult r;
  r.name = "ipi \"ping-pong\"";
  r.software_version = std::string(SoftwareVersion());
  r.machine = MachineInfo::Collect(5);
  r.configurations.push_back({{{"transport", "tcp"}, {"wait", "busy-poll"}, {"route", "via-master"}},
                              Synthetic(1, 3'000), "ok", {}});
  r.configurations.push_back({{{"transport", "tcp"}, {"wait", "epoll"}, {"route", "direct"}}, Synthetic(2, 9'000), "ok", {}});
  r.configurations.push_back({{}, HopBreakdown(), "ok", {}});  // a configuration without samples
  ConfigurationResult skipped{{{"transport", "rdma"}}, HopBreakdown(), "ok", {}};
  skipped.status = "skipped: no RDMA device on node-a";
  skipped.measurements = {{"samples_lost", 3}, {"rate_hz", 2500.5}};
  r.configurations.push_back(skipped);
  r.cluster = "local: master + 2 agents";
  r.experiment_json = R"({"name":"x","samples":10})";
  r.clocks.push_back({"node-a", "start", -12.5, 40.25, 81, 16, ""});
  r.clocks.push_back({"node-b", "end", 0, 0, 0, 0, "GetClock: unavailable"});
  return r;
}

std::vector<std::string> SplitCsvLine(const std::string& line) {
  std::vector<std::string> out;
  std::string field;
  bool quoted = false;
  for (size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quoted) {
      if (c == '"' && i + 1 < line.size() && line[i + 1] == '"') {
        field += '"';
        ++i;
      } else if (c == '"') {
        quoted = false;
      } else {
        field += c;
      }
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      out.push_back(field);
      field.clear();
    } else {
      field += c;
    }
  }
  out.push_back(field);
  return out;
}

TEST(MachineInfo, DescribesThisMachine) {
  const MachineInfo m = MachineInfo::Collect();
  char host[256] = {};
  ASSERT_EQ(::gethostname(host, sizeof(host) - 1), 0);
  EXPECT_EQ(m.hostname, host);
  EXPECT_FALSE(m.kernel.empty());
  EXPECT_FALSE(m.cpu_model.empty());
  EXPECT_EQ(m.cores, static_cast<uint32_t>(::sysconf(_SC_NPROCESSORS_ONLN)));
  // A TSC between 100 MHz and 10 GHz.
  EXPECT_GT(m.tsc_khz, 100'000u);
  EXPECT_LT(m.tsc_khz, 10'000'000u);
  EXPECT_FALSE(SoftwareVersion().empty());
  EXPECT_NE(SoftwareVersion(), "unknown");
}

TEST(Results, JsonToResultToJsonIsTheIdentity) {
  const ExperimentResult r = Example();
  const std::string text = r.ToJsonString();
  auto back = ExperimentResult::FromJsonString(text);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, r);
  EXPECT_EQ(back->ToJsonString(), text);
  // And once more through a file.
  const std::string path = ::testing::TempDir() + "/lab_results_test.json";
  ASSERT_TRUE(WriteFile(path, text).ok());
  auto read = ReadFile(path);
  ASSERT_TRUE(read.ok());
  auto again = ExperimentResult::FromJsonString(*read);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->ToJsonString(), text);
  ::unlink(path.c_str());
}

TEST(Results, CsvHasOneRowPerConfigurationAndHop) {
  const ExperimentResult r = Example();
  std::istringstream in(r.ToCsv());
  std::string line;
  ASSERT_TRUE(std::getline(in, line));
  EXPECT_EQ(line, "experiment,configuration,hop,count,min,p50,p90,p99,p999,max,mean,missing,clock_anomalies");
  size_t rows = 0;
  while (std::getline(in, line)) {
    const auto f = SplitCsvLine(line);
    ASSERT_EQ(f.size(), 13u) << line;
    const auto& c = r.configurations[rows / kHopCount];
    const Hop hop = static_cast<Hop>(rows % kHopCount);
    EXPECT_EQ(f[0], r.name);
    EXPECT_EQ(f[1], c.Label());
    EXPECT_EQ(f[2], HopName(hop));
    const HopStats& s = c.hops.hop(hop);
    EXPECT_EQ(f[3], std::to_string(s.histogram.count()));
    EXPECT_EQ(f[4], std::to_string(s.histogram.min()));
    EXPECT_EQ(f[5], std::to_string(s.histogram.Percentile(50)));
    EXPECT_EQ(f[8], std::to_string(s.histogram.Percentile(99.9)));
    EXPECT_EQ(f[9], std::to_string(s.histogram.max()));
    EXPECT_EQ(f[11], std::to_string(s.missing));
    ++rows;
  }
  EXPECT_EQ(rows, r.configurations.size() * kHopCount);
  // The via-master configuration's end to end p50 is larger than each of its hops' p50.
  const auto& c0 = r.configurations[0].hops;
  EXPECT_GT(c0.hop(Hop::kEndToEnd).histogram.Percentile(50), c0.hop(Hop::kMasterReceivedToDecided).histogram.Percentile(50));
  EXPECT_EQ(c0.hop(Hop::kInjectedToGuestHandler).missing, 200u);
}

TEST(Results, TableShowsEveryConfigurationAndHop) {
  const ExperimentResult r = Example();
  const std::string t = FormatTable(r);
  for (const auto& c : r.configurations) EXPECT_NE(t.find(c.Label()), std::string::npos) << c.Label();
  for (size_t i = 0; i < kHopCount; ++i) EXPECT_NE(t.find(HopName(static_cast<Hop>(i))), std::string::npos);
  EXPECT_NE(t.find(r.machine.hostname), std::string::npos);
  // The p50 of the first configuration's end to end, in µs with 2 decimals, appears in the table.
  const auto p50 = r.configurations[0].hops.hop(Hop::kEndToEnd).histogram.Percentile(50);
  EXPECT_NE(t.find(fmt::format("{:.2f}", static_cast<double>(p50) / 1000.0)), std::string::npos);
  // Status, measurements, where it ran and the clocks are shown too.
  EXPECT_NE(t.find("skipped: no RDMA device on node-a"), std::string::npos);
  EXPECT_NE(t.find("rate_hz = 2500.5"), std::string::npos);
  EXPECT_NE(t.find("cluster local: master + 2 agents"), std::string::npos);
  EXPECT_NE(t.find("clock node-a at start: offset -0.0 us +- 0.0 us"), std::string::npos) << t;
  EXPECT_NE(t.find("clock node-b at end: GetClock: unavailable"), std::string::npos);
}

TEST(Results, MalformedFilesAreRefusedWithTheField) {
  const nlohmann::json good = Example().ToJson();
  struct Case {
    const char* field;
    std::function<void(nlohmann::json&)> mutate;
  };
  const Case cases[] = {
      {"format_version", [](auto& j) { j["format_version"] = 99; }},
      {"machine", [](auto& j) { j.erase("machine"); }},
      {"machine.cores", [](auto& j) { j["machine"]["cores"] = -2; }},
      {"configurations[0].label", [](auto& j) { j["configurations"][0]["label"] = "other"; }},
      {"configurations[1].config.route", [](auto& j) { j["configurations"][1]["config"]["route"] = 5; }},
      {"configurations[0].hops", [](auto& j) { j["configurations"][0]["hops"]["hops"][6]["histogram"]["min"] = 0; }},
      {"name", [](auto& j) { j["name"] = 3; }},
  };
  for (const auto& c : cases) {
    nlohmann::json j = good;
    c.mutate(j);
    auto r = ExperimentResult::FromJson(j);
    ASSERT_FALSE(r.ok()) << c.field;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find(c.field), std::string_view::npos) << r.status();
  }
  EXPECT_FALSE(ExperimentResult::FromJsonString("{not json").ok());
  EXPECT_FALSE(ExperimentResult::FromJsonString("").ok());
}

}  // namespace
}  // namespace aggvm::lab

namespace aggvm::lab {
namespace {

// Writes the seed corpus of fuzz/lab_results (run with --gtest_also_run_disabled_tests
// --gtest_filter='*WriteSeedCorpus*' AGGVM_LAB_CORPUS_DIR=fuzz/corpus/lab_results).
TEST(Results, DISABLED_WriteSeedCorpus) {
  const char* dir = std::getenv("AGGVM_LAB_CORPUS_DIR");
  ASSERT_NE(dir, nullptr) << "set AGGVM_LAB_CORPUS_DIR";
  ExperimentResult r;
  r.name = "seed";
  r.software_version = "0.1.0-seed";
  r.machine = {"host", "6.1.0 #1", "cpu", 2, 2'600'000};
  ConfigurationResult c;
  c.config = {{"transport", "tcp"}, {"route", "direct"}};
  for (uint64_t i = 1; i <= 6; ++i) {
    transport::TraceBlock t;
    t.raised = 1000 * i;
    t.local_controller = t.raised + 100 * i;
    t.target_received = t.local_controller + 5000 * i;
    t.injected = t.target_received + 300;
    c.hops.Add(t, i % 2 ? t.injected + 77 : 0);
  }
  r.configurations.push_back(c);
  ASSERT_TRUE(WriteFile(std::string(dir) + "/result.json", r.ToJson().dump()).ok());
  ASSERT_TRUE(WriteFile(std::string(dir) + "/histogram.json",
                        c.hops.hop(Hop::kEndToEnd).histogram.ToJson().dump()).ok());
  ExperimentResult e;
  e.name = "empty";
  ASSERT_TRUE(WriteFile(std::string(dir) + "/empty.json", e.ToJson().dump()).ok());
}

}  // namespace
}  // namespace aggvm::lab

namespace aggvm::lab {
namespace {

TEST(Results, FilesAskingForTooMuchHistogramMemoryAreRefused) {
  // 4 significant digits over 1 ns .. 1 hour: 7 x ~3.8 MiB per configuration. Repeat one until over the budget.
  auto b = HopBreakdown::Create({4, 1, 3'600'000'000'000});
  ASSERT_TRUE(b.ok());
  ExperimentResult r;
  r.name = "big";
  const size_t per_config = kHopCount * b->hop(Hop::kEndToEnd).histogram.bucket_count() * sizeof(uint64_t);
  nlohmann::json j = r.ToJson();
  const nlohmann::json one = {{"config", nlohmann::json::object()}, {"label", "default"}, {"hops", b->ToJson()}};
  for (size_t used = 0; used <= kMaxHistogramMemory; used += per_config) j["configurations"].push_back(one);
  auto parsed = ExperimentResult::FromJson(j);
  ASSERT_FALSE(parsed.ok());
  EXPECT_NE(parsed.status().message().find("MiB"), std::string_view::npos) << parsed.status();
  // A couple of such configurations are fine.
  j["configurations"] = nlohmann::json::array({one, one});
  EXPECT_TRUE(ExperimentResult::FromJson(j).ok());
}

}  // namespace
}  // namespace aggvm::lab
