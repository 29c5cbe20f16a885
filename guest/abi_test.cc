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
  EXPECT_EQ(sizeof(aggvm_boot_info), 48u + 4u * AGGVM_MAX_VCPUS);
}

TEST(GuestAbi, FixedAddressesDoNotOverlap) {
  // Status page, BootInfo, GDT/TSS, page tables and the image each have their own range below/at 1 MiB.
  EXPECT_LT(AGGVM_STATUS_GPA + 8u * AGGVM_MAX_VCPUS, AGGVM_BOOTINFO_GPA + 1u);
  EXPECT_LE(AGGVM_BOOTINFO_GPA + sizeof(aggvm_boot_info), AGGVM_GDT_GPA);
  EXPECT_LT(AGGVM_TSS_GPA, AGGVM_PML4_GPA);
  EXPECT_LE(AGGVM_PML4_GPA + 6u * 4096u, AGGVM_IMAGE_MIN_GPA);
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

}  // namespace
}  // namespace aggvm::guest
