#include "vcpu/vcpu_exit.h"

#include <cstring>
#include <memory>

#include <gtest/gtest.h>

namespace aggvm::vcpu {
namespace {

// A fake kvm_run page as KVM would fill it: the struct followed by the port I/O data area.
class FakeRun {
 public:
  static constexpr size_t kSize = 8192;
  FakeRun() : mem_(new uint64_t[kSize / 8]()) {}
  kvm_run& run() { return *reinterpret_cast<kvm_run*>(mem_.get()); }
  uint8_t* at(size_t off) { return reinterpret_cast<uint8_t*>(mem_.get()) + off; }

 private:
  std::unique_ptr<uint64_t[]> mem_;
};

TEST(VcpuExit, DecodesPortOutWithData) {
  FakeRun f;
  f.run().exit_reason = KVM_EXIT_IO;
  f.run().io.direction = KVM_EXIT_IO_OUT;
  f.run().io.port = 0xA61;
  f.run().io.size = 4;
  f.run().io.count = 1;
  f.run().io.data_offset = 4096;
  const uint32_t v = 0x12345678;
  std::memcpy(f.at(4096), &v, 4);
  VcpuExit e = DecodeExit(f.run(), FakeRun::kSize);
  auto* out = std::get_if<IoOut>(&e);
  ASSERT_NE(out, nullptr) << DescribeExit(e);
  EXPECT_EQ(out->port, 0xA61);
  EXPECT_EQ(out->Value(), v);
}

TEST(VcpuExit, PortInSpanWritesIntoRunPage) {
  FakeRun f;
  f.run().exit_reason = KVM_EXIT_IO;
  f.run().io.direction = KVM_EXIT_IO_IN;
  f.run().io.port = 0x60;
  f.run().io.size = 2;
  f.run().io.count = 3;
  f.run().io.data_offset = 4096;
  VcpuExit e = DecodeExit(f.run(), FakeRun::kSize);
  auto* in = std::get_if<IoIn>(&e);
  ASSERT_NE(in, nullptr);
  ASSERT_EQ(in->data.size(), 6u);
  in->data[5] = 0xAB;
  EXPECT_EQ(*f.at(4096 + 5), 0xAB);
}

TEST(VcpuExit, RefusesPortDataOutsideMapping) {
  FakeRun f;
  f.run().exit_reason = KVM_EXIT_IO;
  f.run().io.direction = KVM_EXIT_IO_OUT;
  f.run().io.size = 4;
  f.run().io.count = 2000;  // 8000 bytes from offset 4096 > 8192
  f.run().io.data_offset = 4096;
  EXPECT_TRUE(std::holds_alternative<UnknownExit>(DecodeExit(f.run(), FakeRun::kSize)));
  f.run().io.count = 1;
  f.run().io.size = 3;
  EXPECT_TRUE(std::holds_alternative<UnknownExit>(DecodeExit(f.run(), FakeRun::kSize)));
  f.run().io.size = 1;
  f.run().io.data_offset = FakeRun::kSize;
  EXPECT_TRUE(std::holds_alternative<UnknownExit>(DecodeExit(f.run(), FakeRun::kSize)));
}

TEST(VcpuExit, DecodesMmioEoiAndFaults) {
  FakeRun f;
  f.run().exit_reason = KVM_EXIT_MMIO;
  f.run().mmio.phys_addr = 0xC0000000;
  f.run().mmio.len = 4;
  f.run().mmio.is_write = 0;
  VcpuExit e = DecodeExit(f.run(), FakeRun::kSize);
  ASSERT_TRUE(std::holds_alternative<MmioRead>(e));
  EXPECT_EQ(std::get<MmioRead>(e).gpa, GuestAddress(0xC0000000));
  f.run().mmio.len = 9;
  EXPECT_TRUE(std::holds_alternative<UnknownExit>(DecodeExit(f.run(), FakeRun::kSize)));

  f.run().exit_reason = KVM_EXIT_IOAPIC_EOI;
  f.run().eoi.vector = 0x51;
  e = DecodeExit(f.run(), FakeRun::kSize);
  ASSERT_TRUE(std::holds_alternative<IoapicEoi>(e));
  EXPECT_EQ(std::get<IoapicEoi>(e).vector, Vector(0x51));

  f.run().exit_reason = KVM_EXIT_SHUTDOWN;
  EXPECT_TRUE(std::holds_alternative<Shutdown>(DecodeExit(f.run(), FakeRun::kSize)));
  f.run().exit_reason = KVM_EXIT_INTERNAL_ERROR;
  f.run().internal.suberror = KVM_INTERNAL_ERROR_EMULATION;
  e = DecodeExit(f.run(), FakeRun::kSize);
  ASSERT_TRUE(std::holds_alternative<InternalError>(e));
  EXPECT_EQ(std::get<InternalError>(e).suberror, uint32_t{KVM_INTERNAL_ERROR_EMULATION});
  f.run().exit_reason = 9999;
  e = DecodeExit(f.run(), FakeRun::kSize);
  ASSERT_TRUE(std::holds_alternative<UnknownExit>(e));
  EXPECT_NE(DescribeExit(e).find("9999"), std::string::npos);
}

TEST(VcpuExit, RdmsrReplyAndGpGoIntoRunPage) {
  FakeRun f;
  f.run().exit_reason = KVM_EXIT_X86_RDMSR;
  f.run().msr.reason = KVM_MSR_EXIT_REASON_FILTER;
  f.run().msr.index = 0x1B;
  f.run().msr.error = 1;  // stale value from an earlier exit: decoding resets it
  VcpuExit e = DecodeExit(f.run(), FakeRun::kSize);
  auto* rd = std::get_if<MsrRead>(&e);
  ASSERT_NE(rd, nullptr) << DescribeExit(e);
  EXPECT_EQ(rd->index, 0x1Bu);
  EXPECT_EQ(rd->reason, MsrExitReason::kFilter);
  EXPECT_EQ(f.run().msr.error, 0);
  rd->Reply(0xFEE00900);
  EXPECT_EQ(f.run().msr.data, 0xFEE00900u);
  EXPECT_EQ(f.run().msr.error, 0);
  rd->InjectGp();
  EXPECT_EQ(f.run().msr.error, 1);
}

TEST(VcpuExit, WrmsrCarriesValueAndReason) {
  FakeRun f;
  f.run().exit_reason = KVM_EXIT_X86_WRMSR;
  f.run().msr.reason = KVM_MSR_EXIT_REASON_INVAL;
  f.run().msr.index = 0x830;
  f.run().msr.data = (3ull << 32) | 0x4040;  // x2APIC ICR: destination in the high dword
  VcpuExit e = DecodeExit(f.run(), FakeRun::kSize);
  auto* wr = std::get_if<MsrWrite>(&e);
  ASSERT_NE(wr, nullptr) << DescribeExit(e);
  EXPECT_EQ(wr->index, 0x830u);
  EXPECT_EQ(wr->reason, MsrExitReason::kInvalid);
  EXPECT_EQ(wr->value >> 32, 3u);
  EXPECT_EQ(f.run().msr.error, 0);
  wr->InjectGp();
  EXPECT_EQ(f.run().msr.error, 1);
  EXPECT_NE(DescribeExit(e).find("WRMSR 0x830"), std::string::npos) << DescribeExit(e);

  f.run().msr.reason = 0x80;
  e = DecodeExit(f.run(), FakeRun::kSize);
  EXPECT_EQ(std::get<MsrWrite>(e).reason, MsrExitReason::kOther);
}

}  // namespace
}  // namespace aggvm::vcpu
