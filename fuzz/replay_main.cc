// Driver for fuzz targets in builds without libFuzzer: replays every file of the corpus folders given as
// arguments, then a fixed-seed stream of random inputs and of byte-level mutations of the corpus entries.
// A crash, sanitizer report or abort fails the test; otherwise it prints what it ran.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

int main(int argc, char** argv) {
  std::vector<std::vector<uint8_t>> corpus;
  for (int i = 1; i < argc; ++i) {
    std::error_code ec;
    if (!std::filesystem::is_directory(argv[i], ec)) {
      std::fprintf(stderr, "corpus folder %s does not exist: a replay without its seeds tests almost nothing\n", argv[i]);
      return 2;
    }
    size_t before = corpus.size();
    for (const auto& e : std::filesystem::directory_iterator(argv[i])) {
      std::ifstream in(e.path(), std::ios::binary);
      corpus.emplace_back(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
    if (corpus.size() == before) {
      std::fprintf(stderr, "corpus folder %s is empty: add seed inputs\n", argv[i]);
      return 2;
    }
  }
  for (const auto& c : corpus) LLVMFuzzerTestOneInput(c.data(), c.size());

  std::mt19937_64 rng(0xA66D);
  // AGGVM_FUZZ_REPLAY_INPUTS overrides the count (the sanitizer build uses fewer: it is ~20x slower per input).
  int kRandom = 200000;
  if (const char* n = std::getenv("AGGVM_FUZZ_REPLAY_INPUTS"); n != nullptr && std::atoi(n) > 0) kRandom = std::atoi(n);
  std::vector<uint8_t> buf;
  for (int i = 0; i < kRandom; ++i) {
    if (!corpus.empty() && (i & 1)) {
      buf = corpus[rng() % corpus.size()];
      const int flips = 1 + static_cast<int>(rng() % 4);
      for (int f = 0; f < flips && !buf.empty(); ++f) buf[rng() % buf.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));
    } else {
      buf.resize(rng() % 160);
      for (auto& b : buf) b = static_cast<uint8_t>(rng());
    }
    LLVMFuzzerTestOneInput(buf.data(), buf.size());
  }
  std::printf("replayed %zu corpus inputs and %d generated inputs\n", corpus.size(), kRandom);
  return 0;
}
