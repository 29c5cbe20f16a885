#include "vcpu/elf_loader.h"

#include <elf.h>

#include <cstring>
#include <fstream>
#include <iterator>

#include <fmt/format.h>

#include "absl/strings/str_cat.h"
#include "vcpu/guest_memory.h"

namespace aggvm::vcpu {
namespace {

absl::Status Bad(std::string_view what) {
  return absl::InvalidArgumentError(fmt::format("not a loadable x86-64 guest ELF: {}", what));
}

// [off, off + len) inside a buffer of `size` bytes, without overflow.
bool InFile(uint64_t off, uint64_t len, uint64_t size) { return off <= size && len <= size - off; }

}  // namespace

absl::StatusOr<ElfImage> ParseElf(std::span<const uint8_t> file, GuestAddress min_gpa, GuestAddress max_gpa) {
  Elf64_Ehdr eh;
  if (file.size() < sizeof eh) return Bad(absl::StrCat("file has ", file.size(), " bytes, shorter than an ELF header"));
  std::memcpy(&eh, file.data(), sizeof eh);
  if (std::memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0) return Bad("bad magic (expected \\x7fELF)");
  if (eh.e_ident[EI_CLASS] != ELFCLASS64) return Bad(absl::StrCat("ELF class ", eh.e_ident[EI_CLASS], ", need 64-bit"));
  if (eh.e_ident[EI_DATA] != ELFDATA2LSB) return Bad("not little-endian");
  if (eh.e_machine != EM_X86_64) return Bad(absl::StrCat("e_machine ", eh.e_machine, ", need EM_X86_64 (62)"));
  if (eh.e_type != ET_EXEC) return Bad(absl::StrCat("e_type ", eh.e_type, ", need ET_EXEC (a static executable)"));
  if (eh.e_phentsize != sizeof(Elf64_Phdr)) return Bad(absl::StrCat("e_phentsize ", eh.e_phentsize));
  if (eh.e_phnum == 0 || eh.e_phnum > 64) return Bad(absl::StrCat("e_phnum ", eh.e_phnum, " (need 1..64)"));
  if (!InFile(eh.e_phoff, uint64_t{eh.e_phnum} * sizeof(Elf64_Phdr), file.size())) {
    return Bad(absl::StrCat("program headers at offset ", eh.e_phoff, " run past the end of the file"));
  }

  ElfImage image;
  image.entry = eh.e_entry;
  bool entry_loaded = false;
  for (unsigned i = 0; i < eh.e_phnum; ++i) {
    Elf64_Phdr ph;
    std::memcpy(&ph, file.data() + eh.e_phoff + i * sizeof(Elf64_Phdr), sizeof ph);
    if (ph.p_type != PT_LOAD || ph.p_memsz == 0) continue;
    const std::string seg = absl::StrCat("segment ", i, " (gpa ", absl::Hex(ph.p_paddr), ", ", ph.p_memsz, " bytes)");
    if (ph.p_filesz > ph.p_memsz) return Bad(absl::StrCat(seg, ": p_filesz > p_memsz"));
    if (!InFile(ph.p_offset, ph.p_filesz, file.size())) return Bad(absl::StrCat(seg, ": file data past end of file"));
    if (ph.p_vaddr != ph.p_paddr) return Bad(absl::StrCat(seg, ": p_vaddr != p_paddr (the guest is identity-mapped)"));
    if (ph.p_paddr < min_gpa.raw() || ph.p_paddr > max_gpa.raw() || ph.p_memsz > max_gpa.raw() - ph.p_paddr) {
      return Bad(absl::StrCat(seg, ": outside the image area [", absl::Hex(min_gpa.raw()), ", ",
                              absl::Hex(max_gpa.raw()), ")"));
    }
    for (const auto& other : image.segments) {
      if (ph.p_paddr < other.gpa.raw() + other.mem_size && other.gpa.raw() < ph.p_paddr + ph.p_memsz) {
        return Bad(absl::StrCat(seg, ": overlaps another segment"));
      }
    }
    if (eh.e_entry >= ph.p_paddr && eh.e_entry < ph.p_paddr + ph.p_memsz) entry_loaded = true;
    image.segments.push_back({GuestAddress(ph.p_paddr), ph.p_offset, ph.p_filesz, ph.p_memsz});
  }
  if (image.segments.empty()) return Bad("no PT_LOAD segment");
  if (!entry_loaded) return Bad(absl::StrCat("entry point ", absl::Hex(eh.e_entry), " is not inside a loaded segment"));
  return image;
}

absl::Status LoadElf(const ElfImage& image, std::span<const uint8_t> file, GuestMemory& mem) {
  for (const auto& seg : image.segments) {
    if (!InFile(seg.file_offset, seg.file_size, file.size())) return Bad("segment data past end of file");
    auto dst = mem.Slice(seg.gpa, seg.mem_size);
    if (!dst.ok()) return dst.status();
    std::memcpy(dst->data(), file.data() + seg.file_offset, seg.file_size);
    std::memset(dst->data() + seg.file_size, 0, seg.mem_size - seg.file_size);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint8_t>> ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open guest image '", path, "'"));
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading '", path, "'"));
  return bytes;
}

}  // namespace aggvm::vcpu
