// Host-side checks of the probe guest: the ABI layout both sides compile against, and the ELF the build produced
// (the properties the VMM's loader relies on). Running the guest is tested with the VMM (tests/kvm).
#include "guest/abi.h"

#include <elf.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace aggvm::guest {
namespace {

TEST(GuestAbi, RecordLayoutIsFixed) {
  EXPECT_EQ(sizeof(aggvm_record), 32u);
  EXPECT_EQ(offsetof(aggvm_record, magic), 0u);
  EXPECT_EQ(offsetof(aggvm_record, type), 2u);
  EXPECT_EQ(offsetof(aggvm_record, vcpu), 4u);
  EXPECT_EQ(offsetof(aggvm_record, a), 8u);
  EXPECT_EQ(offsetof(aggvm_record, b), 16u);
  EXPECT_EQ(offsetof(aggvm_record, c), 24u);
}

TEST(GuestAbi, BootInfoLayoutIsFixed) {
  EXPECT_EQ(offsetof(aggvm_boot_info, magic), 0u);
  EXPECT_EQ(offsetof(aggvm_boot_info, workload), 12u);
  EXPECT_EQ(offsetof(aggvm_boot_info, flags), 16u);
  EXPECT_EQ(offsetof(aggvm_boot_info, iterations), 20u);
  EXPECT_EQ(offsetof(aggvm_boot_info, ipi_vector), 32u);
  EXPECT_EQ(offsetof(aggvm_boot_info, tsc_khz), 40u);
  EXPECT_EQ(offsetof(aggvm_boot_info, apic_ids), 48u);
  // Appended for issue 6 (an older guest ignores them; offsets are also the trampoline's, guest/percpu.h).
  EXPECT_EQ(offsetof(aggvm_boot_info, dest_kind), 48u + 4u * AGGVM_MAX_VCPUS);
  EXPECT_EQ(offsetof(aggvm_boot_info, timeout_ms), 320u);
  EXPECT_EQ(offsetof(aggvm_boot_info, tpr), 336u);
  EXPECT_EQ(sizeof(aggvm_boot_info), 336u + AGGVM_MAX_VCPUS);
}

TEST(GuestAbi, FixedAddressesDoNotOverlap) {
  // Status page, BootInfo, GDT/TSS, page tables and the image each have their own range below/at 1 MiB.
  EXPECT_LT(AGGVM_STATUS_GPA + 8u * AGGVM_MAX_VCPUS, AGGVM_BOOTINFO_GPA + 1u);
  EXPECT_LE(AGGVM_BOOTINFO_GPA + sizeof(aggvm_boot_info), AGGVM_GDT_GPA);
  EXPECT_LT(AGGVM_TSS_GPA, AGGVM_PML4_GPA);
  EXPECT_LE(AGGVM_PML4_GPA + 6u * 4096u, AGGVM_IMAGE_MIN_GPA);
  // The AP trampoline page sits between the TSS and the page tables, SIPI-addressable (4 KiB aligned, < 1 MiB).
  EXPECT_EQ(AGGVM_TRAMPOLINE_GPA % 4096u, 0u);
  EXPECT_GE(AGGVM_TRAMPOLINE_GPA, AGGVM_TSS_GPA + 0x68u);
  EXPECT_LE(AGGVM_TRAMPOLINE_GPA + AGGVM_TRAMPOLINE_MAX, AGGVM_PML4_GPA);
}

std::vector<char> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

template <typename T>
T At(const std::vector<char>& bytes, std::size_t offset) {
  T value{};
  if (offset + sizeof(T) <= bytes.size()) std::memcpy(&value, bytes.data() + offset, sizeof(T));
  return value;
}

class ProbeGuestElf : public ::testing::Test {
 protected:
  void SetUp() override {
    image_ = ReadFile(AGGVM_PROBE_GUEST_ELF);
    ASSERT_GE(image_.size(), sizeof(Elf64_Ehdr)) << AGGVM_PROBE_GUEST_ELF << " is missing or truncated";
    header_ = At<Elf64_Ehdr>(image_, 0);
    ASSERT_EQ(header_.e_phentsize, sizeof(Elf64_Phdr));
    ASSERT_LE(header_.e_phoff + std::size_t{header_.e_phnum} * sizeof(Elf64_Phdr), image_.size());
    for (unsigned i = 0; i < header_.e_phnum; ++i) {
      const auto ph = At<Elf64_Phdr>(image_, header_.e_phoff + i * sizeof(Elf64_Phdr));
      if (ph.p_type == PT_LOAD) loads_.push_back(ph);
    }
  }
  std::vector<char> image_;
  Elf64_Ehdr header_{};
  std::vector<Elf64_Phdr> loads_;
};

TEST_F(ProbeGuestElf, IsA64BitX86Executable) {
  EXPECT_EQ(std::memcmp(header_.e_ident, ELFMAG, SELFMAG), 0);
  EXPECT_EQ(header_.e_ident[EI_CLASS], ELFCLASS64);
  EXPECT_EQ(header_.e_ident[EI_DATA], ELFDATA2LSB);
  EXPECT_EQ(header_.e_type, ET_EXEC);
  EXPECT_EQ(header_.e_machine, EM_X86_64);
}

TEST_F(ProbeGuestElf, LoadSegmentsLieAtOrAboveOneMebibyteAndFitTheFile) {
  ASSERT_FALSE(loads_.empty());
  for (const auto& ph : loads_) {
    EXPECT_GE(ph.p_paddr, AGGVM_IMAGE_MIN_GPA);
    EXPECT_EQ(ph.p_paddr, ph.p_vaddr) << "identity-mapped guest: physical = virtual";
    EXPECT_LE(ph.p_filesz, ph.p_memsz);
    EXPECT_LE(ph.p_offset + ph.p_filesz, image_.size());
    EXPECT_FALSE((ph.p_flags & PF_W) && (ph.p_flags & PF_X)) << "segment at " << ph.p_vaddr << " is W+X";
    // The whole image, .bss included, stays in the low 16 MiB so a small guest memory holds it.
    EXPECT_LE(ph.p_paddr + ph.p_memsz, 16u << 20);
  }
  for (std::size_t i = 0; i < loads_.size(); ++i) {
    for (std::size_t j = i + 1; j < loads_.size(); ++j) {
      const bool disjoint = loads_[i].p_paddr + loads_[i].p_memsz <= loads_[j].p_paddr ||
                            loads_[j].p_paddr + loads_[j].p_memsz <= loads_[i].p_paddr;
      EXPECT_TRUE(disjoint) << "segments " << i << " and " << j << " overlap";
    }
  }
}

TEST_F(ProbeGuestElf, EntryPointIsInAnExecutableLoadSegment) {
  bool found = false;
  for (const auto& ph : loads_) {
    if (header_.e_entry >= ph.p_vaddr && header_.e_entry < ph.p_vaddr + ph.p_filesz) {
      found = true;
      EXPECT_TRUE(ph.p_flags & PF_X) << "entry " << header_.e_entry << " is in a non-executable segment";
    }
  }
  EXPECT_TRUE(found) << "entry " << header_.e_entry << " is outside every loaded byte";
}

// The image header the VMM reads at entry + 8 names an AP trampoline inside the loaded bytes, at most one page.
TEST_F(ProbeGuestElf, ImageHeaderNamesTheTrampoline) {
  const uint64_t at = header_.e_entry + AGGVM_IMAGE_HEADER_OFFSET;
  const Elf64_Phdr* seg = nullptr;
  for (const auto& ph : loads_) {
    if (at >= ph.p_vaddr && at + 16 <= ph.p_vaddr + ph.p_filesz) seg = &ph;
  }
  ASSERT_NE(seg, nullptr);
  const size_t off = seg->p_offset + (at - seg->p_vaddr);
  EXPECT_EQ(At<uint32_t>(image_, off), AGGVM_IMAGE_HEADER_MAGIC);
  const uint32_t gpa = At<uint32_t>(image_, off + 4);
  const uint32_t size = At<uint32_t>(image_, off + 8);
  EXPECT_GT(size, 16u);
  EXPECT_LE(size, AGGVM_TRAMPOLINE_MAX);
  EXPECT_TRUE(gpa >= seg->p_vaddr && gpa + size <= seg->p_vaddr + seg->p_filesz) << "trampoline at " << gpa;
  EXPECT_EQ(static_cast<uint8_t>(image_[off - AGGVM_IMAGE_HEADER_OFFSET]), 0xEB) << "entry starts with a short jump";
}

}  // namespace
}  // namespace aggvm::guest
