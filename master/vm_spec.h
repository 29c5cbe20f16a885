// The VM spec (proto/aggvm.proto, message VmSpec): parsing what an operator wrote (protobuf text or JSON), filling
// defaults, and validating it against the cluster. Every error names the field at fault and says why, e.g.
//   "placement[1].vcpus[0]: vCPU 2 is also placed on node 'a' (placement[0]); place each vCPU on exactly one node".
// No gRPC here: aggvmctl validates a file offline with it, the master validates again with the registered nodes.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "proto/aggvm.pb.h"

namespace aggvm::master {

namespace v1 = ::aggvm::v1;

/// Limits a spec must respect (the probe-guest runner's, node-agent/probe_vm.h; guest/abi.h AGGVM_MAX_VCPUS).
inline constexpr uint32_t kMaxVcpus = 64;
inline constexpr uint64_t kMinMemoryMib = 4;
inline constexpr uint64_t kMaxMemoryMib = 3072;  // GPA 0xC0000000 and above stay unmapped
inline constexpr uint64_t kDefaultMemoryMib = 64;
inline constexpr uint32_t kDefaultIpiVector = 0x40;
inline constexpr uint32_t kMinVector = 32;   // 0..31: exceptions (SDM vol. 3, 6.3.1)
inline constexpr uint32_t kMaxVector = 254;  // 255: the probe guest's spurious vector
inline constexpr uint32_t kIoApicPins = 24;  // the master's IOAPIC (GSI 0..23): interrupt_routes[].gsi

enum class SpecFormat { kAuto, kText, kJson };

/// Parses a spec. kAuto: JSON if the first non-blank character is '{', protobuf text otherwise. Syntax errors carry
/// the line and column (text) or the parser's message (JSON).
absl::StatusOr<v1::VmSpec> ParseVmSpec(std::string_view text, SpecFormat format = SpecFormat::kAuto);

/// Reads and parses a spec file (.json: JSON; .textproto/.txtpb/.pbtxt: text; else kAuto).
absl::StatusOr<v1::VmSpec> LoadVmSpecFile(const std::string& path);

/// The probe guest this build made (CMake AGGVM_PROBE_GUEST_ELF), "" if unknown.
std::string DefaultGuestImage();

/// A registered node as the validation sees it.
struct KnownNode {
  std::string name;
  bool rdma = false;  // offers an RDMA data-plane endpoint
};

struct SpecContext {
  /// The registered nodes; nullopt: node names and capabilities are not checked (offline validation).
  std::optional<std::vector<KnownNode>> nodes;
  /// Used for an empty image.path.
  std::string default_image = DefaultGuestImage();
};

/// Fills every unset field that has a default (see the "default:" comments in aggvm.proto).
void FillDefaults(v1::VmSpec& spec, const SpecContext& ctx);

/// Checks a spec whose defaults are filled. InvalidArgument listing every problem ("field: why; field: why").
absl::Status ValidateVmSpec(const v1::VmSpec& spec, const SpecContext& ctx);

/// FillDefaults + ValidateVmSpec.
absl::StatusOr<v1::VmSpec> NormalizeVmSpec(v1::VmSpec spec, const SpecContext& ctx);

/// The routing rules alone (also used by SetRoutingPolicy): a known policy; static routes only with
/// ROUTING_POLICY_STATIC, at least one then, vectors 32..254 without duplicates, vCPUs < `vcpus`.
absl::Status ValidateRouting(v1::RoutingPolicy policy, const google::protobuf::RepeatedPtrField<v1::StaticRoute>& routes,
                             uint32_t vcpus, std::string_view field_prefix = "");

/// The probe-guest workloads by name (guest/abi.h enum aggvm_workload); nullopt for an unknown name.
std::optional<uint32_t> WorkloadByName(std::string_view name);
/// "hello, ipi-pingpong, ..." for error messages.
std::string WorkloadNames();

/// The end (exclusive) of the highest PT_LOAD segment of the ELF at `path`: the guest RAM it needs.
absl::StatusOr<uint64_t> ImageEnd(const std::string& path);

/// Short one-line form of a spec for logs ("demo: 6 vCPUs on a[0,1] b[2,3] c[4,5], 64 MiB, hello").
std::string DescribeVmSpec(const v1::VmSpec& spec);

}  // namespace aggvm::master
