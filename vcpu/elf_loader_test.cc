#include "vcpu/elf_loader.h"

#include <elf.h>

#include <cstring>
#include <vector>

#include <gtest/gtest.h>

namespace aggvm::vcpu {
namespace {

constexpr GuestAddress kMin(0x100000);
constexpr GuestAddress kMax(0x4000000);

// A minimal valid image: one PT_LOAD at 1 MiB holding 16 bytes of code plus 64 bytes of .bss.
std::vector<uint8_t> ValidElf() {
  std::vector<uint8_t> f(sizeof(Elf64_Ehdr) + sizeof(Elf64_Phdr) + 16, 0);
  Elf64_Ehdr eh{};
  std::memcpy(eh.e_ident, ELFMAG, SELFMAG);
  eh.e_ident[EI_CLASS] = ELFCLASS64;
  eh.e_ident[EI_DATA] = ELFDATA2LSB;
  eh.e_ident[EI_VERSION] = EV_CURRENT;
  eh.e_type = ET_EXEC;
  eh.e_machine = EM_X86_64;
  eh.e_version = EV_CURRENT;
  eh.e_entry = 0x100000;
  eh.e_phoff = sizeof(Elf64_Ehdr);
  eh.e_ehsize = sizeof(Elf64_Ehdr);
  eh.e_phentsize = sizeof(Elf64_Phdr);
  eh.e_phnum = 1;
  Elf64_Phdr ph{};
  ph.p_type = PT_LOAD;
  ph.p_offset = sizeof(Elf64_Ehdr) + sizeof(Elf64_Phdr);
  ph.p_vaddr = ph.p_paddr = 0x100000;
  ph.p_filesz = 16;
  ph.p_memsz = 80;
  std::memcpy(f.data(), &eh, sizeof eh);
  std::memcpy(f.data() + sizeof eh, &ph, sizeof ph);
  return f;
}

Elf64_Ehdr& Header(std::vector<uint8_t>& f) { return *reinterpret_cast<Elf64_Ehdr*>(f.data()); }
Elf64_Phdr& Phdr(std::vector<uint8_t>& f) { return *reinterpret_cast<Elf64_Phdr*>(f.data() + sizeof(Elf64_Ehdr)); }

void ExpectRejected(const std::vector<uint8_t>& f, const char* needle) {
  auto r = ParseElf(f, kMin, kMax);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find(needle), std::string_view::npos) << r.status();
}

TEST(ElfLoader, AcceptsValidImage) {
  auto f = ValidElf();
  auto r = ParseElf(f, kMin, kMax);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->entry, 0x100000u);
  ASSERT_EQ(r->segments.size(), 1u);
  EXPECT_EQ(r->segments[0].gpa, GuestAddress(0x100000));
  EXPECT_EQ(r->segments[0].file_size, 16u);
  EXPECT_EQ(r->segments[0].mem_size, 80u);
}

TEST(ElfLoader, RejectsTruncatedAndForeignFiles) {
  ExpectRejected({}, "shorter than an ELF header");
  auto f = ValidElf();
  f[0] = 'X';
  ExpectRejected(f, "bad magic");
  f = ValidElf();
  f[EI_CLASS] = ELFCLASS32;
  ExpectRejected(f, "64-bit");
  f = ValidElf();
  Header(f).e_machine = EM_AARCH64;
  ExpectRejected(f, "EM_X86_64");
  f = ValidElf();
  Header(f).e_type = ET_DYN;
  ExpectRejected(f, "ET_EXEC");
}

TEST(ElfLoader, RejectsProgramHeadersOutsideFile) {
  auto f = ValidElf();
  Header(f).e_phoff = ~0ull - 8;  // would overflow offset + size
  ExpectRejected(f, "past the end");
  f = ValidElf();
  Header(f).e_phnum = 0;
  ExpectRejected(f, "e_phnum");
  f = ValidElf();
  Header(f).e_phentsize = 12;
  ExpectRejected(f, "e_phentsize");
}

TEST(ElfLoader, RejectsBadSegments) {
  auto f = ValidElf();
  Phdr(f).p_filesz = 100;  // > memsz
  ExpectRejected(f, "p_filesz > p_memsz");
  f = ValidElf();
  Phdr(f).p_offset = 1u << 20;
  ExpectRejected(f, "past end of file");
  f = ValidElf();
  Phdr(f).p_paddr = Phdr(f).p_vaddr = 0x1000;  // below the image area
  Header(f).e_entry = 0x1000;
  ExpectRejected(f, "outside the image area");
  f = ValidElf();
  Phdr(f).p_paddr = Phdr(f).p_vaddr = ~0ull - 16;  // wraps around
  ExpectRejected(f, "outside the image area");
  f = ValidElf();
  Phdr(f).p_vaddr = 0xffffffff80100000ull;
  ExpectRejected(f, "p_vaddr != p_paddr");
  f = ValidElf();
  Phdr(f).p_type = PT_NOTE;
  ExpectRejected(f, "no PT_LOAD");
  f = ValidElf();
  Header(f).e_entry = 0x200000;
  ExpectRejected(f, "entry point");
}

}  // namespace
}  // namespace aggvm::vcpu
