// libFuzzer target: the lab's JSON readers on arbitrary bytes must never crash; whatever they accept must survive a
// write -> read round trip unchanged, and every query on an accepted histogram must stay within its recorded range.
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include <nlohmann/json.hpp>

#include "lab/results.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace aggvm::lab;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto result = ExperimentResult::FromJsonString(text);
  if (result.ok()) {
    const std::string again = result->ToJsonString();
    auto reread = ExperimentResult::FromJsonString(again);
    if (!reread.ok() || !(*reread == *result) || reread->ToJsonString() != again) std::abort();
    (void)result->ToCsv();
  } else if (result.status().message().empty()) {
    std::abort();  // every refusal explains itself
  }
  auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  auto h = LatencyHistogram::FromJson(j);
  if (!h.ok()) return 0;
  for (double p : {0.0, 1.0, 50.0, 99.9, 100.0}) {
    const uint64_t v = h->Percentile(p);
    if (h->count() > 0 && (v < h->min() || v > h->max())) std::abort();
  }
  auto back = LatencyHistogram::FromJson(h->ToJson());
  if (!back.ok() || !(*back == *h)) std::abort();
  LatencyHistogram merged = *h;
  if (!merged.Merge(*h).ok() || merged.count() != 2 * h->count()) std::abort();
  return 0;
}
