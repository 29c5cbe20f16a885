// aggvmctl: the operator's CLI for an aggvm cluster (see docs/control-plane.md). Parses flags, runs one command.
#include <iostream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "absl/status/status.h"
#include "ctl/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"aggvmctl: control an aggvm cluster through its master"};
  app.require_subcommand(1);
  aggvm::ctl::CtlOptions opt;
  double timeout_s = 5;
  app.add_option("--master", opt.master, "master address host:port")->capture_default_str()->envname("AGGVM_MASTER");
  app.add_option("--timeout", timeout_s, "seconds allowed per call")->capture_default_str()->check(CLI::Range(0.1, 3600.0));

  std::string spec_file, name, verb;
  aggvm::ctl::FollowOptions follow;
  double follow_for_s = 0;
  bool follow_flag = false;

  auto* status = app.add_subcommand("status", "cluster status: nodes, health, last heartbeat, VMs");
  auto* vm = app.add_subcommand("vm", "VM commands")->require_subcommand(1);
  auto* create = vm->add_subcommand("create", "create a VM from a spec file (protobuf text or JSON)");
  create->add_option("SPEC_FILE", spec_file)->required()->check(CLI::ExistingFile);
  auto* validate = vm->add_subcommand("validate", "check a spec file offline (no master needed)");
  validate->add_option("SPEC_FILE", spec_file)->required()->check(CLI::ExistingFile);
  CLI::App* lifecycle[3];
  const char* verbs[3] = {"start", "pause", "stop"};
  for (int i = 0; i < 3; ++i) {
    lifecycle[i] = vm->add_subcommand(verbs[i], std::string(verbs[i]) + " a VM on every node it is placed on");
    lifecycle[i]->add_option("NAME", name)->required();
  }
  auto* list = vm->add_subcommand("list", "list the VMs");
  auto* get = vm->add_subcommand("get", "show a VM's state and full spec");
  get->add_option("NAME", name)->required();
  auto* topology = vm->add_subcommand("topology", "show vCPU -> node -> APIC ID");
  topology->add_option("NAME", name)->required();
  auto* routing = vm->add_subcommand("routing", "show the VM's interrupt routing table");
  routing->add_option("NAME", name)->required();
  std::string policy;
  std::vector<std::string> pins;
  auto* policy_cmd = vm->add_subcommand("policy", "switch the VM's interrupt routing policy (at once while it runs)");
  policy_cmd->add_option("NAME", name)->required();
  policy_cmd->add_option("POLICY", policy, "sdm, round-robin, node-local-first or static")->required();
  policy_cmd->add_option("--pin", pins, "static policy: VECTOR=VCPU (repeatable), e.g. --pin 0x44=5");
  aggvm::ctl::DoorbellOptions bell;
  bool deassert_flag = false, assert_flag = false;
  auto* doorbell = app.add_subcommand("doorbell", "have a node raise a GSI, as a device there would (test device)");
  doorbell->add_option("VM", bell.vm)->required();
  doorbell->add_option("--node", bell.node, "the node that raises the interrupt")->required();
  doorbell->add_option("--gsi", bell.gsi, "the GSI (IOAPIC pin 0..23 to reach the guest)")->required();
  doorbell->add_flag("--level", bell.level, "level-triggered: hold the line (until --deassert)");
  doorbell->add_flag("--assert", assert_flag, "level: raise the line (the default)");
  doorbell->add_flag("--deassert", deassert_flag, "level: drop the line");
  doorbell->add_flag("--traced", bell.traced, "fill the frames' trace block");
  doorbell->add_option("--count", bell.count,
                       "a train of N edges raised by the node on its own clock (with --interval-us); a new train "
                       "replaces a running one");
  doorbell->add_option("--interval-us", bell.interval_us, "the train's spacing, 10..1000000 µs");
  auto* console = app.add_subcommand("console", "print the VM's guest console lines as they arrive");
  console->add_option("NAME", name)->required();
  console->add_flag("--follow,-f", follow_flag, "keep following (the default; kept for familiarity)");
  uint32_t clock_samples = 16;
  auto* clocks = app.add_subcommand("clocks", "each node's clock offset against the master, with its uncertainty");
  clocks->add_option("--samples", clock_samples, "GetClock round trips per node")
      ->check(CLI::Range(1u, 1000u))
      ->capture_default_str();
  auto* events = app.add_subcommand("events", "print cluster events (nodes joining / lost, VM state changes)");
  for (auto* sub : {console, events}) {
    sub->add_option("--for", follow_for_s, "stop after this many seconds");
    sub->add_option("--lines", follow.max_lines, "stop after this many console lines");
    sub->add_flag("--records", follow.records, "also print the guest's records (irq vector + rdtsc, hello, ...)");
  }
  CLI11_PARSE(app, argc, argv);
  opt.timeout = absl::Seconds(timeout_s);
  if (follow_for_s > 0) follow.duration = absl::Seconds(follow_for_s);

  absl::Status st;
  std::ostream& out = std::cout;
  if (*status) st = aggvm::ctl::Status(opt, out);
  else if (*create) st = aggvm::ctl::VmCreate(opt, spec_file, out);
  else if (*validate) st = aggvm::ctl::VmValidate(spec_file, out);
  else if (*list) st = aggvm::ctl::VmList(opt, out);
  else if (*get) st = aggvm::ctl::VmGet(opt, name, out);
  else if (*topology) st = aggvm::ctl::VmTopology(opt, name, out);
  else if (*routing) st = aggvm::ctl::VmRouting(opt, name, out);
  else if (*policy_cmd) st = aggvm::ctl::VmPolicy(opt, name, policy, pins, out);
  else if (*doorbell) {
    if (assert_flag && deassert_flag) {
      st = absl::InvalidArgumentError("--assert and --deassert exclude each other");
    } else if (deassert_flag && !bell.level) {
      st = absl::InvalidArgumentError("--deassert applies to --level doorbells only (an edge is one rising edge)");
    } else {
      bell.deassert = deassert_flag;
      st = aggvm::ctl::Doorbell(opt, bell, out);
    }
  }
  else if (*console) st = aggvm::ctl::Console(opt, name, follow, out);
  else if (*events) st = aggvm::ctl::Events(opt, follow, out);
  else if (*clocks) st = aggvm::ctl::Clocks(opt, clock_samples, out);
  else {
    for (int i = 0; i < 3; ++i) {
      if (*lifecycle[i]) st = aggvm::ctl::VmLifecycle(opt, verbs[i], name, out);
    }
  }
  if (!st.ok()) {
    std::cerr << "aggvmctl: " << st.message() << "\n";
    return st.code() == absl::StatusCode::kUnavailable ? 2 : 1;
  }
  return 0;
}
