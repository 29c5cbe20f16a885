// Loading a static x86-64 ELF executable (the probe guest) into guest memory. The file is untrusted input: every
// header field that leads to an offset or a guest address is checked, and a malformed file is a clear error
// (System V gABI, "ELF Header" / "Program Header"; the guest runs identity-mapped, so each PT_LOAD segment must have
// p_vaddr == p_paddr).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/types.h"

namespace aggvm::vcpu {

class GuestMemory;

struct ElfSegment {
  GuestAddress gpa;
  uint64_t file_offset = 0;
  uint64_t file_size = 0;
  uint64_t mem_size = 0;  // >= file_size; the rest is zeroed (.bss)
};

struct ElfImage {
  uint64_t entry = 0;
  std::vector<ElfSegment> segments;  // PT_LOAD only
};

/// Validates `file` as an ELF64 little-endian x86-64 executable whose PT_LOAD segments lie in
/// [min_gpa, max_gpa) and whose entry point is inside one of them.
absl::StatusOr<ElfImage> ParseElf(std::span<const uint8_t> file, GuestAddress min_gpa, GuestAddress max_gpa);

/// Copies the segments of `image` (parsed from `file`) into `mem`, zeroing each segment's tail.
absl::Status LoadElf(const ElfImage& image, std::span<const uint8_t> file, GuestMemory& mem);

/// Reads a whole file (for the guest image).
absl::StatusOr<std::vector<uint8_t>> ReadWholeFile(const std::string& path);

}  // namespace aggvm::vcpu
