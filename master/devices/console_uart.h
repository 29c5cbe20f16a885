// The VM's one console: a 16550A UART subset at COM1 (0x3F8..0x3FF) on the master, written by every vCPU of the VM
// whichever node it runs on (National Semiconductor PC16550D datasheet, "Registers", Table II).
//
// Output only. Registers (offset, DLAB = LCR bit 7):
//   0  write THR (DLAB 0): one character of the writing vCPU's console line; read RBR: 0 (no input ever arrives).
//      DLAB 1: DLL, read/write storage.
//   1  IER (DLAB 0, bits 3:0 stored) / DLM (DLAB 1, stored). No interrupt is ever raised: the transmitter is always
//      empty and nothing is received.
//   2  read IIR: 0x01 "no interrupt pending", | 0xC0 when FIFOs are enabled; write FCR: bit 0 (FIFO enable) stored.
//   3  LCR, read/write storage (bit 7 = DLAB).
//   4  MCR bits 4:0, read/write storage.
//   5  read LSR: 0x60 (THRE | TEMT: transmitter empty, no data ready). Writes ignored (counted).
//   6  read MSR: 0x00. Writes ignored (counted).
//   7  SCR, read/write storage.
// Characters are collected PER vCPU (vCPUs on different nodes write concurrently; one shared line would interleave
// them): '\n' ends the line and hands it to the sink, '\r' is dropped, a line longer than kMaxLine characters is
// handed over in pieces (counted). Accesses wider than one byte are ignored (counted) and read as all ones.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "common/counter.h"
#include "master/devices/pio_device.h"

namespace aggvm::master {

/// Receives each complete console line of vCPU `vcpu` (without the '\n'), on the master's data-plane thread.
using ConsoleSink = std::function<void(VcpuIndex vcpu, std::string_view line)>;

struct ConsoleUartCounters {
  Counter characters;
  Counter lines;
  Counter split_lines;     // lines longer than kMaxLine handed over in pieces
  Counter ignored_writes;  // LSR / MSR writes
  Counter wide_accesses;   // 2- or 4-byte accesses (the 16550 is byte-wide)
  Counter bad_vcpus;       // an access naming a vCPU beyond the VM's count (the caller should have refused it)
};

class ConsoleUart final : public PioDevice {
 public:
  static constexpr uint16_t kCom1Base = 0x3F8;
  static constexpr size_t kMaxLine = 256;
  static constexpr uint8_t kLsrThrEmpty = 0x20;
  static constexpr uint8_t kLsrTransmitterEmpty = 0x40;
  static constexpr uint8_t kLcrDlab = 0x80;

  /// `sink` may be empty (lines are then counted and discarded).
  ConsoleUart(uint32_t num_vcpus, ConsoleSink sink, uint16_t base = kCom1Base);

  [[nodiscard]] std::string_view name() const override { return "console-uart"; }
  [[nodiscard]] uint16_t base() const override { return base_; }
  [[nodiscard]] uint16_t size() const override { return 8; }
  uint32_t Read(VcpuIndex vcpu, uint16_t offset, uint8_t size) override;
  void Write(VcpuIndex vcpu, uint16_t offset, uint8_t size, uint32_t value) override;

  /// Hands over every vCPU's unfinished line (e.g. when the VM stops).
  void Flush();
  [[nodiscard]] const ConsoleUartCounters& counters() const { return counters_; }

 private:
  void Emit(uint32_t vcpu);

  const uint16_t base_;
  ConsoleSink sink_;
  std::vector<std::string> lines_;  // per vCPU, capacity kMaxLine reserved once
  uint8_t ier_ = 0, lcr_ = 0, mcr_ = 0, scr_ = 0, dll_ = 0x01, dlm_ = 0, fcr_ = 0;
  ConsoleUartCounters counters_;
};

}  // namespace aggvm::master
