// Human-readable table of an experiment result: one block per configuration, one line per hop, latencies in µs.
#pragma once

#include <string>

#include "lab/results.h"

namespace aggvm::lab {

/// Header lines (experiment, software version, machine) then, per configuration, its label and a table with the
/// columns hop, count, min, p50, p90, p99, p99.9, max (µs, 2 decimals), missing, anomalies.
std::string FormatTable(const ExperimentResult& result);

}  // namespace aggvm::lab
