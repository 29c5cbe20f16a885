// libFuzzer target: DecodeFrame on arbitrary bytes must never crash, and whatever it accepts must be a frame that
// ValidateFrame accepts and that re-encodes to exactly the same 64 bytes (the wire format has one encoding per frame).
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "transport/frame.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace aggvm::transport;
  auto decoded = DecodeFrame(data, size);
  if (!decoded.ok()) {
    if (decoded.status().message().empty()) std::abort();  // every refusal explains itself
    return 0;
  }
  if (size != kFrameSize || !ValidateFrame(*decoded).ok()) std::abort();
  WireFrame again;
  EncodeFrame(*decoded, again);
  if (std::memcmp(again.data(), data, kFrameSize) != 0) std::abort();
  (void)FrameTypeName(decoded->type);
  return 0;
}
