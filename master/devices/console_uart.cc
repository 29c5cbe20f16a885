#include "master/devices/console_uart.h"

namespace aggvm::master {

ConsoleUart::ConsoleUart(uint32_t num_vcpus, ConsoleSink sink, uint16_t base)
    : base_(base), sink_(std::move(sink)), lines_(num_vcpus) {
  for (auto& l : lines_) l.reserve(kMaxLine);
}

uint32_t ConsoleUart::Read(VcpuIndex vcpu, uint16_t offset, uint8_t size) {
  (void)vcpu;
  if (size != 1) {
    counters_.wide_accesses.Add();
    return 0xFFFFFFFFu;
  }
  const bool dlab = (lcr_ & kLcrDlab) != 0;
  switch (offset) {
    case 0: return dlab ? dll_ : 0;  // RBR: nothing is ever received
    case 1: return dlab ? dlm_ : ier_;
    case 2: return 0x01u | ((fcr_ & 1) ? 0xC0u : 0u);
    case 3: return lcr_;
    case 4: return mcr_;
    case 5: return kLsrThrEmpty | kLsrTransmitterEmpty;
    case 6: return 0;
    case 7: return scr_;
    default: return 0xFF;
  }
}

void ConsoleUart::Write(VcpuIndex vcpu, uint16_t offset, uint8_t size, uint32_t value) {
  if (size != 1) {
    counters_.wide_accesses.Add();
    return;
  }
  const auto v = static_cast<uint8_t>(value);
  const bool dlab = (lcr_ & kLcrDlab) != 0;
  switch (offset) {
    case 0:
      if (dlab) {
        dll_ = v;
        return;
      }
      break;  // THR, below
    case 1:
      if (dlab) {
        dlm_ = v;
      } else {
        ier_ = v & 0x0F;
      }
      return;
    case 2: fcr_ = v & 0x01; return;
    case 3: lcr_ = v; return;
    case 4: mcr_ = v & 0x1F; return;
    case 7: scr_ = v; return;
    default: counters_.ignored_writes.Add(); return;
  }
  if (vcpu.value() >= lines_.size()) {
    counters_.bad_vcpus.Add();
    return;
  }
  counters_.characters.Add();
  std::string& line = lines_[vcpu.value()];
  if (v == '\r') return;
  if (v == '\n') {
    Emit(vcpu.value());
    return;
  }
  line.push_back(static_cast<char>(v));
  if (line.size() >= kMaxLine) {
    counters_.split_lines.Add();
    Emit(vcpu.value());
  }
}

void ConsoleUart::Emit(uint32_t vcpu) {
  std::string& line = lines_[vcpu];
  counters_.lines.Add();
  if (sink_) sink_(VcpuIndex(vcpu), line);
  line.clear();  // keeps the capacity
}

void ConsoleUart::Flush() {
  for (uint32_t i = 0; i < lines_.size(); ++i) {
    if (!lines_[i].empty()) Emit(i);
  }
}

}  // namespace aggvm::master
