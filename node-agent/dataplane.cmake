# The node's data plane (engineer "dataplane"): local interrupt controller and forwarded I/O (pure logic over a
# Transport and a VmPort), and the VmPort backed by the vcpu layer's InterruptInjector.
add_library(aggvm_node_dataplane STATIC
  ${CMAKE_CURRENT_LIST_DIR}/local_controller.cc
  ${CMAKE_CURRENT_LIST_DIR}/io_forwarder.cc
  ${CMAKE_CURRENT_LIST_DIR}/trace_reporter.cc
  ${CMAKE_CURRENT_LIST_DIR}/raise_train.cc)
aggvm_target_defaults(aggvm_node_dataplane)
target_link_libraries(aggvm_node_dataplane PUBLIC aggvm_transport aggvm_irqchip aggvm_common)

add_library(aggvm_node_injector_port STATIC ${CMAKE_CURRENT_LIST_DIR}/injector_vm_port.cc)
aggvm_target_defaults(aggvm_node_injector_port)
target_link_libraries(aggvm_node_injector_port PUBLIC aggvm_node_dataplane aggvm_vcpu)

aggvm_test(node_trace_reporter_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/trace_reporter_test.cc
  LIBS aggvm_node_dataplane
  LABELS unit)

aggvm_test(node_raise_train_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/raise_train_test.cc
  LIBS aggvm_node_dataplane
  LABELS unit)

aggvm_test(node_local_controller_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/local_controller_test.cc
  LIBS aggvm_node_dataplane
  LABELS unit
  TIMEOUT 120)
