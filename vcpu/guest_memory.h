// A region of guest-physical memory: an anonymous host mapping registered as one KVM memslot
// (api.rst, KVM_SET_USER_MEMORY_REGION). Every access from the VMM is bounds-checked: a guest-supplied address
// never reaches a raw pointer unchecked.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <type_traits>

#include "absl/status/statusor.h"
#include "common/types.h"

namespace aggvm::vcpu {

class Vm;

class GuestMemory {
 public:
  /// Maps `size` bytes (a multiple of 4 KiB) and registers them as memslot `slot` at guest-physical `base`.
  /// `vm` must outlive the returned object (its destructor removes the memslot).
  static absl::StatusOr<GuestMemory> Create(Vm& vm, uint32_t slot, GuestAddress base, uint64_t size);

  GuestMemory(GuestMemory&& o) noexcept;
  GuestMemory& operator=(GuestMemory&&) = delete;
  GuestMemory(const GuestMemory&) = delete;
  ~GuestMemory();

  [[nodiscard]] GuestAddress base() const { return base_; }
  [[nodiscard]] uint64_t size() const { return size_; }
  /// True when [gpa, gpa + len) lies inside the region.
  [[nodiscard]] bool Contains(GuestAddress gpa, uint64_t len) const;
  /// The host bytes of [gpa, gpa + len), or OutOfRange.
  absl::StatusOr<std::span<uint8_t>> Slice(GuestAddress gpa, uint64_t len);
  absl::Status Write(GuestAddress gpa, std::span<const uint8_t> bytes);

  /// Copies a trivially-copyable T out of guest memory (the guest may change it meanwhile: validate the copy).
  template <typename T>
  absl::StatusOr<T> ReadObject(GuestAddress gpa) {
    static_assert(std::is_trivially_copyable_v<T>);
    auto s = Slice(gpa, sizeof(T));
    if (!s.ok()) return s.status();
    T out;
    std::memcpy(&out, s->data(), sizeof(T));
    return out;
  }
  template <typename T>
  absl::Status WriteObject(GuestAddress gpa, const T& v) {
    static_assert(std::is_trivially_copyable_v<T>);
    return Write(gpa, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(&v), sizeof(T)));
  }

 private:
  GuestMemory(int vm_fd, uint32_t slot, GuestAddress base, uint64_t size, uint8_t* host)
      : vm_fd_(vm_fd), slot_(slot), base_(base), size_(size), host_(host) {}

  int vm_fd_ = -1;  // borrowed
  uint32_t slot_ = 0;
  GuestAddress base_;
  uint64_t size_ = 0;
  uint8_t* host_ = nullptr;
};

}  // namespace aggvm::vcpu
