// Plots of an experiment result through gnuplot (Debian gnuplot-nox): a generated script and data files, run as a
// child process; no plotting library is linked.
//
// For a result and a file stem S, writes into `out_dir`:
//   S-cdf.png / S-cdf.svg    end-to-end latency CDF, one curve per configuration (log x axis, µs)
//   S-hops.png / S-hops.svg  stacked bars of the p50 of each path hop, one bar per configuration (µs)
// plus the inputs kept for reproduction: S-cdf.dat, S-hops.dat, S.gp, and gnuplot's messages in S.gnuplot.log.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "lab/results.h"

namespace aggvm::lab {

struct PlotOptions {
  std::string gnuplot = "gnuplot";  // program name (searched in PATH) or path
  int width = 1000;
  int height = 600;
};

/// Returns the paths of the four images. FAILED_PRECONDITION if no configuration has end-to-end samples;
/// UNAVAILABLE if gnuplot cannot be run or fails (the message carries its log and says how to install it).
absl::StatusOr<std::vector<std::string>> WritePlots(const ExperimentResult& result, const std::string& out_dir,
                                                    const std::string& stem, const PlotOptions& options = {});

}  // namespace aggvm::lab
