// aggvm-plot: turns experiment results files into plots (and optionally a table and CSV).
//
//   aggvm-plot RESULTS.json [MORE.json ...] --out DIR [--table] [--csv] [--gnuplot PATH]
//
// For each results file R.json it writes DIR/R-cdf.{png,svg} and DIR/R-hops.{png,svg} (see lab/plot.h); with --csv
// also DIR/R.csv; with --table it prints the human table to stdout.
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "lab/plot.h"
#include "lab/results.h"
#include "lab/table.h"

int main(int argc, char** argv) {
  CLI::App app{"aggvm-plot: latency CDF and per-hop bars (PNG + SVG, through gnuplot) from aggvm results files"};
  std::vector<std::string> inputs;
  std::string out_dir;
  bool table = false, csv = false;
  aggvm::lab::PlotOptions options;
  app.add_option("results", inputs, "results JSON files (written by the latency lab)")->required()->check(
      CLI::ExistingFile);
  app.add_option("--out", out_dir, "output directory (created if missing)")->required();
  app.add_flag("--table", table, "also print the human table");
  app.add_flag("--csv", csv, "also write DIR/<name>.csv");
  app.add_option("--gnuplot", options.gnuplot, "gnuplot program")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) {
    std::fprintf(stderr, "aggvm-plot: cannot create output directory %s: %s\n", out_dir.c_str(), ec.message().c_str());
    return 1;
  }
  int failures = 0;
  for (const auto& path : inputs) {
    auto text = aggvm::lab::ReadFile(path);
    if (!text.ok()) {
      std::fprintf(stderr, "aggvm-plot: %s\n", std::string(text.status().message()).c_str());
      ++failures;
      continue;
    }
    auto result = aggvm::lab::ExperimentResult::FromJsonString(*text);
    if (!result.ok()) {
      std::fprintf(stderr, "aggvm-plot: %s: %s\n", path.c_str(), std::string(result.status().message()).c_str());
      ++failures;
      continue;
    }
    const std::string stem = std::filesystem::path(path).stem().string();
    if (table) std::fputs(aggvm::lab::FormatTable(*result).c_str(), stdout);
    if (csv) {
      if (auto s = aggvm::lab::WriteFile(out_dir + "/" + stem + ".csv", result->ToCsv()); !s.ok()) {
        std::fprintf(stderr, "aggvm-plot: %s\n", std::string(s.message()).c_str());
        ++failures;
      }
    }
    auto images = aggvm::lab::WritePlots(*result, out_dir, stem, options);
    if (!images.ok()) {
      std::fprintf(stderr, "aggvm-plot: %s: %s\n", path.c_str(), std::string(images.status().message()).c_str());
      ++failures;
      continue;
    }
    for (const auto& image : *images) std::printf("%s\n", image.c_str());
  }
  return failures == 0 ? 0 : 1;
}
