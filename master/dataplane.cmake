# The master's data plane (engineer "dataplane"): the global interrupt controller and the master devices.
# Pure logic over a Transport: no gRPC here, so the control plane and the tests link it cheaply.
add_library(aggvm_master_dataplane STATIC
  ${CMAKE_CURRENT_LIST_DIR}/global_controller.cc
  ${CMAKE_CURRENT_LIST_DIR}/devices/pio_device.cc
  ${CMAKE_CURRENT_LIST_DIR}/devices/console_uart.cc
  ${CMAKE_CURRENT_LIST_DIR}/devices/doorbell.cc)
aggvm_target_defaults(aggvm_master_dataplane)
target_link_libraries(aggvm_master_dataplane PUBLIC aggvm_irqchip aggvm_transport aggvm_common)

aggvm_test(master_devices_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/devices/devices_test.cc
  LIBS aggvm_master_dataplane
  LABELS unit)
aggvm_test(master_global_controller_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/global_controller_test.cc
  LIBS aggvm_master_dataplane
  LABELS unit
  TIMEOUT 120)
