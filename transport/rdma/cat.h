// Internal: message concatenation for error texts. (Debian's Abseil is built with its own absl::string_view, so
// absl::StrCat does not take std::string_view; fmt does.)
#pragma once

#include <iterator>
#include <string>

#include <fmt/format.h>

namespace aggvm::transport::rdma {

template <typename... Args>
std::string Cat(const Args&... args) {
  std::string s;
  (fmt::format_to(std::back_inserter(s), "{}", args), ...);
  return s;
}

}  // namespace aggvm::transport::rdma
