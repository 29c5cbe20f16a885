// Unit tests of the VM spec rules (master/vm_spec.h): each rule is broken once and the error must name the field.
#include "master/vm_spec.h"

#include <elf.h>
#include <unistd.h>

#include <cstring>
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace aggvm::master {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

#ifndef AGGVM_PROBE_GUEST_ELF
#define AGGVM_PROBE_GUEST_ELF ""
#endif

// A minimal static x86-64 ELF with one PT_LOAD segment at 1 MiB of `mem_size` bytes (mostly .bss).
std::string WriteTestElf(uint64_t mem_size) {
  Elf64_Ehdr eh{};
  std::memcpy(eh.e_ident, ELFMAG, SELFMAG);
  eh.e_ident[EI_CLASS] = ELFCLASS64;
  eh.e_ident[EI_DATA] = ELFDATA2LSB;
  eh.e_ident[EI_VERSION] = EV_CURRENT;
  eh.e_type = ET_EXEC;
  eh.e_machine = EM_X86_64;
  eh.e_version = EV_CURRENT;
  eh.e_entry = 0x100000;
  eh.e_phoff = sizeof eh;
  eh.e_ehsize = sizeof eh;
  eh.e_phentsize = sizeof(Elf64_Phdr);
  eh.e_phnum = 1;
  Elf64_Phdr ph{};
  ph.p_type = PT_LOAD;
  ph.p_flags = PF_R | PF_X;
  ph.p_offset = 0;
  ph.p_vaddr = ph.p_paddr = 0x100000;
  ph.p_filesz = sizeof eh + sizeof ph;
  ph.p_memsz = mem_size;
  std::string path = ::testing::TempDir() + "/aggvm_spec_test_" + std::to_string(getpid()) + "_" +
                     std::to_string(mem_size) + ".elf";
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(&eh), sizeof eh);
  out.write(reinterpret_cast<const char*>(&ph), sizeof ph);
  return path;
}

constexpr const char* kGood = R"pb(
  name: "demo"
  vcpus: 6
  placement { node: "a" vcpus: [0, 1] }
  placement { node: "b" vcpus: [2, 3] }
  placement { node: "c" vcpus: [4, 5] }
  workload { name: "hello" }
)pb";

SpecContext Cluster() {
  SpecContext ctx;
  ctx.nodes = std::vector<KnownNode>{{"a", false}, {"b", false}, {"c", true}};
  ctx.default_image = AGGVM_PROBE_GUEST_ELF;
  return ctx;
}

v1::VmSpec Good() {
  auto spec = ParseVmSpec(kGood);
  EXPECT_TRUE(spec.ok()) << spec.status();
  return *spec;
}

absl::Status Check(const v1::VmSpec& spec, const SpecContext& ctx = Cluster()) {
  return NormalizeVmSpec(spec, ctx).status();
}

std::string Message(const absl::Status& st) { return std::string(st.message()); }

TEST(VmSpec, GoodSpecGetsDefaults) {
  ASSERT_FALSE(std::string(AGGVM_PROBE_GUEST_ELF).empty()) << "the build passes the probe guest's path";
  auto spec = NormalizeVmSpec(Good(), Cluster());
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->memory_mib(), kDefaultMemoryMib);
  EXPECT_EQ(spec->irqchip(), v1::IRQCHIP_MODE_KERNEL);
  EXPECT_EQ(spec->transport(), v1::TRANSPORT_KIND_TCP);
  EXPECT_EQ(spec->routing_policy(), v1::ROUTING_POLICY_SDM);
  EXPECT_EQ(spec->route_mode(), v1::ROUTE_MODE_VIA_MASTER);
  EXPECT_EQ(spec->wait_mode(), v1::WAIT_MODE_BUSY_POLL);
  EXPECT_EQ(spec->image().path(), AGGVM_PROBE_GUEST_ELF);
  EXPECT_EQ(spec->workload().name(), "hello");
}

TEST(VmSpec, JsonAndTextAgree) {
  auto json = ParseVmSpec(R"({"name": "demo", "vcpus": 6, "placement": [
      {"node": "a", "vcpus": [0, 1]}, {"node": "b", "vcpus": [2, 3]}, {"node": "c", "vcpus": [4, 5]}],
      "workload": {"name": "hello"}})");
  ASSERT_TRUE(json.ok()) << json.status();
  EXPECT_EQ(json->SerializeAsString(), Good().SerializeAsString());
}

TEST(VmSpec, SyntaxErrorsCarryPosition) {
  auto text = ParseVmSpec("name: \"x\"\nvcpus: many\n");
  ASSERT_FALSE(text.ok());
  EXPECT_THAT(Message(text.status()), HasSubstr("line 2"));
  auto unknown = ParseVmSpec("name: \"x\"\ncpus: 4\n");
  ASSERT_FALSE(unknown.ok());
  EXPECT_THAT(Message(unknown.status()), HasSubstr("cpus"));
  auto json = ParseVmSpec(R"({"name": "x", "vcpus": "lots"})");
  ASSERT_FALSE(json.ok());
  EXPECT_THAT(Message(json.status()), HasSubstr("JSON"));
}

TEST(VmSpec, ZeroVcpus) {
  auto spec = Good();
  spec.set_vcpus(0);
  EXPECT_THAT(Message(Check(spec)), HasSubstr("vcpus: 0 vCPUs"));
}

TEST(VmSpec, Issue6WorkloadFieldsAreChecked) {
  auto spec = Good();
  spec.set_route_mode(v1::ROUTE_MODE_DIRECT);
  spec.mutable_workload()->set_name("lowest-priority");
  spec.mutable_workload()->set_dest_kind("x2apic-logical");
  EXPECT_TRUE(Check(spec).ok()) << Check(spec);
  spec.mutable_workload()->set_dest_kind("everyone");
  EXPECT_THAT(Message(Check(spec)), HasSubstr("workload.dest_kind: unknown 'everyone'"));
  spec.mutable_workload()->clear_dest_kind();
  spec.mutable_workload()->add_tpr(0x100);
  EXPECT_THAT(Message(Check(spec)), HasSubstr("workload.tpr[0]: 256"));
  spec.mutable_workload()->clear_tpr();
  spec.mutable_workload()->set_nowhere_apic_id(0);
  EXPECT_THAT(Message(Check(spec)), HasSubstr("workload.nowhere_apic_id: APIC ID 0 belongs to vCPU 0"));
}

TEST(VmSpec, TooManyVcpus) {
  auto spec = Good();
  spec.set_vcpus(65);
  EXPECT_THAT(Message(Check(spec)), AllOf(HasSubstr("vcpus: 65"), HasSubstr("maximum of 64")));
}

TEST(VmSpec, UnknownNode) {
  auto spec = Good();
  spec.mutable_placement(1)->set_node("zz");
  EXPECT_THAT(Message(Check(spec)), AllOf(HasSubstr("placement[1].node"), HasSubstr("unknown node 'zz'"),
                                          HasSubstr("registered nodes: [a, b, c]")));
  // Offline validation (no node list) does not check names.
  SpecContext offline;
  offline.default_image = AGGVM_PROBE_GUEST_ELF;
  EXPECT_TRUE(Check(spec, offline).ok());
}

TEST(VmSpec, OverlappingPlacement) {
  auto spec = Good();
  spec.mutable_placement(2)->set_vcpus(0, 2);
  EXPECT_THAT(Message(Check(spec)), AllOf(HasSubstr("placement[2].vcpus[0]: vCPU 2 is also placed on node 'b'"),
                                          HasSubstr("placement: vCPU(s) 4 placed on no node")));
}

TEST(VmSpec, SameNodeTwice) {
  auto spec = Good();
  spec.mutable_placement(2)->set_node("a");
  EXPECT_THAT(Message(Check(spec)), HasSubstr("placement[2].node: node 'a' is already used by placement[0]"));
}

TEST(VmSpec, VcpuPlacedNowhere) {
  auto spec = Good();
  spec.mutable_placement(2)->mutable_vcpus()->RemoveLast();
  EXPECT_THAT(Message(Check(spec)), HasSubstr("placement: vCPU(s) 5 placed on no node"));
  spec.clear_placement();
  EXPECT_THAT(Message(Check(spec)), HasSubstr("placement: empty"));
}

TEST(VmSpec, VcpuOutOfRange) {
  auto spec = Good();
  spec.mutable_placement(0)->add_vcpus(9);
  EXPECT_THAT(Message(Check(spec)), HasSubstr("placement[0].vcpus[2]: vCPU 9 does not exist"));
}

TEST(VmSpec, MemoryTooSmallForImage) {
  const std::string big = WriteTestElf(40ull << 20);  // ends at 1 MiB + 40 MiB
  auto spec = Good();
  spec.mutable_image()->set_path(big);
  spec.set_memory_mib(32);
  EXPECT_THAT(Message(Check(spec)), AllOf(HasSubstr("memory_mib: 32 MiB is too small for image"),
                                          HasSubstr("0x2900000"), HasSubstr("at least 41 MiB")));
  spec.set_memory_mib(41);
  EXPECT_TRUE(Check(spec).ok()) << Check(spec);
  auto end = ImageEnd(big);
  ASSERT_TRUE(end.ok());
  EXPECT_EQ(*end, 0x100000u + (40ull << 20));
  unlink(big.c_str());
}

TEST(VmSpec, MemoryOutOfRange) {
  auto spec = Good();
  spec.set_memory_mib(2);
  EXPECT_THAT(Message(Check(spec)), HasSubstr("memory_mib: 2 MiB is outside 4..3072 MiB"));
  spec.set_memory_mib(4096);
  EXPECT_THAT(Message(Check(spec)), HasSubstr("memory_mib: 4096 MiB is outside"));
}

TEST(VmSpec, MissingImage) {
  auto spec = Good();
  spec.mutable_image()->set_path("/nonexistent/guest.elf");
  EXPECT_THAT(Message(Check(spec)), AllOf(HasSubstr("image.path: cannot use '/nonexistent/guest.elf'"),
                                          HasSubstr("cannot open")));
}

TEST(VmSpec, ImageNotAnElf) {
  const std::string path = ::testing::TempDir() + "/aggvm_spec_test_not_elf_" + std::to_string(getpid());
  std::ofstream(path) << "#!/bin/sh\n# a shell script is not a guest image, however long it is: " << std::string(64, '#') << "\n";
  auto spec = Good();
  spec.mutable_image()->set_path(path);
  EXPECT_THAT(Message(Check(spec)), AllOf(HasSubstr("image.path"), HasSubstr("bad magic")));
  unlink(path.c_str());
}

TEST(VmSpec, UnknownWorkload) {
  auto spec = Good();
  spec.mutable_workload()->set_name("fortune");
  EXPECT_THAT(Message(Check(spec)), AllOf(HasSubstr("workload.name: unknown workload 'fortune'"),
                                          HasSubstr("hello, ipi-pingpong")));
}

TEST(VmSpec, PingPongNeedsDistinctExistingVcpus) {
  auto spec = Good();
  spec.mutable_workload()->set_name("ipi-pingpong");
  auto filled = NormalizeVmSpec(spec, Cluster());
  ASSERT_TRUE(filled.ok()) << filled.status();
  EXPECT_EQ(filled->workload().pong_vcpu(), 1u);
  EXPECT_EQ(filled->workload().ipi_vector(), kDefaultIpiVector);
  spec.mutable_workload()->set_ping_vcpu(3);
  spec.mutable_workload()->set_pong_vcpu(3);
  EXPECT_THAT(Message(Check(spec)), HasSubstr("workload.pong_vcpu: same vCPU 3 as ping_vcpu"));
  spec.mutable_workload()->set_pong_vcpu(8);
  spec.mutable_workload()->set_ipi_vector(7);
  EXPECT_THAT(Message(Check(spec)), AllOf(HasSubstr("workload.pong_vcpu: vCPU 8 does not exist"),
                                          HasSubstr("workload.ipi_vector: 7 is outside 32..254")));
}

TEST(VmSpec, BadStaticRoutes) {
  auto spec = Good();
  auto* r = spec.add_static_routes();
  r->set_vector(0x50);
  r->set_vcpu(1);
  EXPECT_THAT(Message(Check(spec)), HasSubstr("static_routes: 1 route(s) given but routing_policy is ROUTING_POLICY_SDM"));
  spec.set_routing_policy(v1::ROUTING_POLICY_STATIC);
  EXPECT_TRUE(Check(spec).ok()) << Check(spec);
  auto* dup = spec.add_static_routes();
  dup->set_vector(0x50);
  dup->set_vcpu(7);
  auto* low = spec.add_static_routes();
  low->set_vector(3);
  low->set_vcpu(0);
  EXPECT_THAT(Message(Check(spec)), AllOf(HasSubstr("static_routes[1].vector: vector 80 is already routed by static_routes[0]"),
                                          HasSubstr("static_routes[1].vcpu: vCPU 7 does not exist"),
                                          HasSubstr("static_routes[2].vector: 3 is outside 32..254")));
  spec.clear_static_routes();
  EXPECT_THAT(Message(Check(spec)), HasSubstr("static_routes: empty but routing_policy is ROUTING_POLICY_STATIC"));
}

TEST(VmSpec, UnknownEnumValues) {
  auto spec = ParseVmSpec(R"({"name": "demo", "vcpus": 1, "placement": [{"node": "a", "vcpus": [0]}],
                              "irqchip": 7, "transport": 9})");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_THAT(Message(Check(*spec)), AllOf(HasSubstr("irqchip: unknown value 7"), HasSubstr("transport: unknown value 9")));
}

TEST(VmSpec, RdmaNeedsRdmaNodes) {
  auto spec = Good();
  spec.set_transport(v1::TRANSPORT_KIND_RDMA);
  const std::string msg = Message(Check(spec));
  EXPECT_THAT(msg, AllOf(HasSubstr("placement[0].node: transport is TRANSPORT_KIND_RDMA but node 'a'"),
                         HasSubstr("placement[1].node")));
  EXPECT_THAT(msg, ::testing::Not(HasSubstr("placement[2].node")));  // c offers rdma
}

TEST(VmSpec, BadName) {
  auto spec = Good();
  spec.set_name("my vm/1");
  EXPECT_THAT(Message(Check(spec)), HasSubstr("name: 'my vm/1' is not a VM name"));
}

TEST(VmSpec, EveryProblemIsListed) {
  auto spec = Good();
  spec.set_vcpus(0);
  spec.mutable_workload()->set_name("nope");
  spec.mutable_image()->set_path("/nonexistent");
  const std::string msg = Message(Check(spec));
  EXPECT_THAT(msg, AllOf(HasSubstr("vcpus:"), HasSubstr("workload.name:"), HasSubstr("image.path:")));
}

TEST(VmSpec, ExampleFilesAreValid) {
  for (const char* f : {"probe-3x2.textproto", "probe-3x2.json"}) {
    auto spec = LoadVmSpecFile(std::string(AGGVM_SOURCE_DIR) + "/deploy/examples/" + f);
    ASSERT_TRUE(spec.ok()) << f << ": " << spec.status();
    SpecContext ctx;
    ctx.nodes = std::vector<KnownNode>{{"node-a", false}, {"node-b", false}, {"node-c", false}};
    ctx.default_image = AGGVM_PROBE_GUEST_ELF;
    EXPECT_TRUE(Check(*spec, ctx).ok()) << f << ": " << Check(*spec, ctx);
  }
}

}  // namespace
}  // namespace aggvm::master
