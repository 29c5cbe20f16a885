/*
 * The proxy vCPU stub's fixed layout (see proxy_vcpu.h, docs/proxy.md): shared by proxy_stub.S and the C++ loader.
 *
 * Two memslots just below 4 GiB, outside any guest RAM the VMM describes to the guest:
 *   read-only  [AGGVM_PROXY_RO_GPA, 4 GiB): GDT + TSS, IDT, page tables, the stub code, and the reset vector at
 *              0xFFFFFFF0 (where a vCPU starts after INIT; SDM vol. 3, 10.1.4 "First Instruction Executed").
 *              KVM_MEM_READONLY: a guest write to it exits as MMIO on the guest's vCPU, it cannot change the stub.
 *   read-write [AGGVM_PROXY_RW_GPA, +AGGVM_PROXY_RW_SIZE): one small stack per proxy (interrupt frames only).
 * Page tables map 0xFFE00000..0xFFFFFFFF with one 2 MiB page; every entry has A (and the leaf D) preset so the
 * page walker never writes the read-only tables.
 */
#ifndef AGGVM_VCPU_PROXY_STUB_ABI_H
#define AGGVM_VCPU_PROXY_STUB_ABI_H

#define AGGVM_PROXY_RO_GPA 0xFFFF0000
#define AGGVM_PROXY_RO_SIZE 0x10000
#define AGGVM_PROXY_RW_GPA 0xFFFE0000
#define AGGVM_PROXY_RW_SIZE 0x10000
#define AGGVM_PROXY_STACK_BYTES 0x400 /* 64 proxies per VM */

#define AGGVM_PROXY_GDT_GPA 0xFFFF0000  /* null, code64 0x08, data 0x10, TSS 0x18 (16 bytes) */
#define AGGVM_PROXY_TSS_GPA 0xFFFF0800
#define AGGVM_PROXY_IDT_GPA 0xFFFF1000  /* 256 x 16-byte interrupt gates */
#define AGGVM_PROXY_PML4_GPA 0xFFFF2000 /* PDPT at +0x1000, PD at +0x2000 */

/* The stub (proxy_stub.S) is one 4 KiB page at AGGVM_PROXY_CODE_GPA, position independent except for the reset
   vector, which lies at its last 16 bytes. */
#define AGGVM_PROXY_CODE_GPA 0xFFFFF000
#define AGGVM_PROXY_CODE_SIZE 0x1000
#define AGGVM_PROXY_HANDLER_STRIDE 8    /* handler of vector v at offset v * 8 */
#define AGGVM_PROXY_ENTRY_OFFSET 0x800  /* 64-bit entry: enable the x2APIC, TPR 0, sti; hlt loop */
#define AGGVM_PROXY_RESET_OFFSET 0xFF0  /* 16-bit code at 0xFFFFFFF0 */

/* Ports the stub OUTs a byte to (8-bit immediate ports: one instruction each). */
#define AGGVM_PROXY_PORT_EVENT 0x7A /* vector 32..255 of an accepted interrupt, 2 for an NMI, 0 = stub ready */
#define AGGVM_PROXY_PORT_FAULT 0x7B /* an exception (vector 0..31 other than 2) hit the stub: it stops */
#define AGGVM_PROXY_PORT_INIT 0x7C  /* the reset vector ran: the proxy accepted an INIT */

#endif /* AGGVM_VCPU_PROXY_STUB_ABI_H */
