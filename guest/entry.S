/*
 * The probe guest's entry point and interrupt stubs (x86-64, AT&T syntax).
 *
 * Guest CPL0 code is emulated on the target machines (~0.65 us per instruction), so the interrupt paths below are
 * written by hand and kept to a few dozen instructions; the main line and the cold exception path are in main.c.
 * None of this code touches SSE state.
 */
#include "percpu.h"

#define AREA_SHIFT 14
#if (1 << AREA_SHIFT) != AGGVM_AREA_SIZE
#error "AREA_SHIFT does not match AGGVM_AREA_SIZE"
#endif

/* EOI to the local APIC; %rcx = this vCPU's area. Clobbers rax, rcx, rdx. Fixed interrupts only: the spurious
   vector takes no EOI (SDM Vol. 3A 11.9). */
.macro EOI
        testb   $1, PC_X2APIC(%rcx)
        jz      91f
        mov     $LAPIC_X2APIC_MSR_EOI, %ecx
        xor     %eax, %eax
        xor     %edx, %edx
        wrmsr
        jmp     92f
91:     mov     $LAPIC_XAPIC_BASE, %ecx
        movl    $0, LAPIC_XAPIC_EOI(%rcx)
92:
.endm

        .section .text.entry, "ax"
        .code64
        .globl  _start
/* RDI = vCPU index, RSI = BootInfo GPA; interrupts are off. Pick this vCPU's stack (an index past the last area
   gets the spare area, where guest_main reports the bad index) and call guest_main(index, bootinfo).
   The first two bytes jump over the image header the VMM reads (abi.h AGGVM_IMAGE_HEADER_*). */
_start:
        jmp     .Lstart
        .balign GUEST_IMAGE_HEADER_OFFSET, 0xcc
        .globl  aggvm_image_header
aggvm_image_header:
        .long   GUEST_IMAGE_HEADER_MAGIC
        .long   aggvm_trampoline
        .long   aggvm_trampoline_end - aggvm_trampoline
        .long   0
.Lstart:
        cli
        cld
        mov     %rdi, %rax
        cmp     $GUEST_MAX_VCPUS, %rax
        jb      1f
        mov     $GUEST_MAX_VCPUS, %eax
1:      shl     $AREA_SHIFT, %rax
        lea     aggvm_vcpu_areas+AGGVM_AREA_SIZE(%rax), %rsp
        xor     %ebp, %ebp
        call    guest_main
2:      cli
        hlt
        jmp     2b

/* 256 stubs of 16 bytes each, vector v at aggvm_isr_stubs + 16 * v. The block is 4 KiB aligned and 4 KiB long, so
   bits 16..63 of every stub address are the same and main.c builds each IDT gate by adding 16 to the previous one.
   - 0..31 (exceptions): push a dummy error code where the CPU pushes none (SDM Vol. 3A 6.15), push the vector,
     go to exc_common, which reports the exception and never returns.
   - 32..254: save rax/rdx, rdtsc (the "handler entry" timestamp), push the vector, go to irq_common.
   - 255 (spurious vector of the SVR): iretq, no EOI. */
        .section .text.isr, "ax"
        .balign 4096
        .globl  aggvm_isr_stubs
aggvm_isr_stubs:
        .set    .Lvec, 0
        .rept   256
        .balign 16, 0xcc
        .if .Lvec < 32
        .if (.Lvec == 8) || (.Lvec == 10) || (.Lvec == 11) || (.Lvec == 12) || (.Lvec == 13) || (.Lvec == 14) || (.Lvec == 17) || (.Lvec == 21) || (.Lvec == 29) || (.Lvec == 30)
        push    $.Lvec
        .else
        push    $0
        push    $.Lvec
        .endif
        jmp     exc_common
        .elseif .Lvec == AGGVM_SPURIOUS_VECTOR
        iretq
        .else
        push    %rax
        push    %rdx
        rdtsc
        push    $.Lvec
        jmp     irq_common
        .endif
        .set    .Lvec, .Lvec + 1
        .endr
        .balign 16, 0xcc
        .globl  aggvm_isr_stubs_end
aggvm_isr_stubs_end:

        .text
/* Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS. Fatal: guest_exception reports and does not return. */
exc_common:
        mov     %rsp, %rdi
        and     $-16, %rsp
        call    guest_exception
1:      cli
        hlt
        jmp     1b

/* Any vector 32..254 that has no dedicated handler: one IRQ record (a = vector, b = rdtsc at entry, c = sequence),
   sent while the vector is still in service, then EOI. As few instructions as possible before the OUT: each one
   adds ~0.65 us to the interrupt latency the VMM measures.
   Stack on entry: vector (sign-extended imm8: use its low byte), saved rdx, saved rax; edx:eax = rdtsc. */
irq_common:
        push    %rcx
        mov     %rsp, %rcx
        and     $-AGGVM_AREA_SIZE, %rcx
        mov     %eax, PC_IRQ_REC+16(%rcx)       /* b = rdtsc, low and high halves */
        mov     %edx, PC_IRQ_REC+20(%rcx)
        movzbl  8(%rsp), %eax
        mov     %rax, PC_IRQ_REC+8(%rcx)        /* a = vector */
        bts     %rax, PC_SEEN(%rcx)             /* the main line polls this (interrupt gates: no nesting) */
        lea     PC_IRQ_REC(%rcx), %eax          /* c already holds this record's sequence number */
        mov     $GUEST_PORT_RECORD, %edx
        out     %eax, (%dx)                     /* the VMM copies the record during this exit ... */
        incq    PC_IRQ_REC+24(%rcx)             /* ... so c can move on to the next sequence number now */
        EOI
        pop     %rcx
        add     $8, %rsp
        pop     %rdx
        pop     %rax
        iretq

/* ipi-pingpong, ping side: the answer arrived. Timestamp it, raise the flag the main line waits on, EOI. */
        .globl  aggvm_ping_handler
aggvm_ping_handler:
        push    %rax
        push    %rdx
        rdtsc
        push    %rcx
        mov     %rsp, %rcx
        and     $-AGGVM_AREA_SIZE, %rcx
        shl     $32, %rdx
        or      %rdx, %rax
        mov     %rax, PC_PING_TSC(%rcx)
        movl    $1, PC_PING_FLAG(%rcx)
        EOI
        pop     %rcx
        pop     %rdx
        pop     %rax
        iretq

/* ipi-pingpong, pong side: answer with the same vector (ICR prepared by main.c), count the answer, EOI.
   x2APIC: one WRMSR to the ICR (destination in bits 63:32, SDM Vol. 3A 11.12.9). xAPIC: destination into ICR high
   first, then ICR low, whose write sends (SDM Vol. 3A 11.6.1). */
        .globl  aggvm_pong_handler
aggvm_pong_handler:
        push    %rax
        push    %rdx
        push    %rcx
        mov     %rsp, %rcx
        and     $-AGGVM_AREA_SIZE, %rcx
        incl    PC_PONG_COUNT(%rcx)
        testb   $1, PC_X2APIC(%rcx)
        jz      1f
        mov     PC_ICR_LO(%rcx), %eax
        mov     PC_ICR_HI(%rcx), %edx
        mov     $LAPIC_X2APIC_MSR_ICR, %ecx
        wrmsr
        mov     $LAPIC_X2APIC_MSR_EOI, %ecx
        xor     %eax, %eax
        xor     %edx, %edx
        wrmsr
        jmp     2f
1:      mov     PC_ICR_LO(%rcx), %eax
        mov     PC_ICR_HI(%rcx), %edx
        mov     $LAPIC_XAPIC_BASE, %ecx
        mov     %edx, LAPIC_XAPIC_ICR_HI(%rcx)
        mov     %eax, LAPIC_XAPIC_ICR_LO(%rcx)
        movl    $0, LAPIC_XAPIC_EOI(%rcx)
2:      pop     %rcx
        pop     %rdx
        pop     %rax
        iretq

/* nmi workload, pong side (IDT vector 2): record NMI (a = sequence, b = rdtsc at entry), then answer the ping with
   the fixed IPI prepared in PC_ICR_* (as aggvm_pong_handler does). No EOI: an NMI has none (SDM Vol. 3A 11.8.5);
   IRETQ ends NMI blocking. Uses its own record: an NMI may interrupt irq_common halfway through PC_IRQ_REC. */
        .globl  aggvm_nmi_handler
aggvm_nmi_handler:
        push    %rax
        push    %rdx
        push    %rcx
        rdtsc
        mov     %rsp, %rcx
        and     $-AGGVM_AREA_SIZE, %rcx
        mov     %eax, PC_NMI_REC+16(%rcx)
        mov     %edx, PC_NMI_REC+20(%rcx)
        mov     PC_NMI_COUNT(%rcx), %eax
        mov     %rax, PC_NMI_REC+8(%rcx)
        incl    PC_NMI_COUNT(%rcx)
        lea     PC_NMI_REC(%rcx), %eax
        mov     $GUEST_PORT_RECORD, %edx
        out     %eax, (%dx)
        testb   $1, PC_X2APIC(%rcx)
        jz      1f
        mov     PC_ICR_LO(%rcx), %eax
        mov     PC_ICR_HI(%rcx), %edx
        mov     $LAPIC_X2APIC_MSR_ICR, %ecx
        wrmsr
        jmp     2f
1:      mov     PC_ICR_LO(%rcx), %eax
        mov     PC_ICR_HI(%rcx), %edx
        mov     $LAPIC_XAPIC_BASE, %ecx
        mov     %edx, LAPIC_XAPIC_ICR_HI(%rcx)
        mov     %eax, LAPIC_XAPIC_ICR_LO(%rcx)
2:      pop     %rcx
        pop     %rdx
        pop     %rax
        iretq

/* ---- AP start-up trampoline (ap-bringup) ----
   Assembled here, run at GUEST_TRAMPOLINE_GPA: the VMM of every node copies the bytes from aggvm_trampoline to
   aggvm_trampoline_end there (found through the image header). Every absolute address below is therefore written as
   TRAMP(label) = GUEST_TRAMPOLINE_GPA + (label - aggvm_trampoline), a constant the assembler resolves.
   After SIPI the AP runs in real mode at CS = vector << 8, IP = 0 (SDM Vol. 3A 9.4.4.1, 9.1.4). Steps (SDM Vol. 3A
   9.9.1 "Switching to Protected Mode", 9.8.5 "Initializing IA-32e Mode"): load a small GDT of its own, CR0.PE,
   far jump to 32-bit code; CR4.PAE|OSFXSR|OSXMMEXCPT, CR3 = the VMM's identity tables, EFER.LME|NXE|SCE, CR0.PG,
   far jump to 64-bit code; then switch to the VMM's GDT (same selectors), reload the data segments, find this vCPU's index from its APIC ID
   (CPUID.1:EBX[31:24]) in BootInfo.apic_ids and enter _start like a vCPU the VMM started. */
#define TRAMP(label) (GUEST_TRAMPOLINE_GPA + ((label) - aggvm_trampoline))
#define TSEL_CODE64 0x08
#define TSEL_DATA 0x10
#define TSEL_CODE32 0x18
        .section .rodata.trampoline, "a"
        .balign 16
        .globl  aggvm_trampoline
aggvm_trampoline:
        .code16
        cli
        xor     %ax, %ax
        mov     %ax, %ds
        lgdtl   TRAMP(.Ltramp_gdtr)
        mov     %cr0, %eax
        or      $1, %eax
        mov     %eax, %cr0
        ljmpl   $TSEL_CODE32, $TRAMP(.Ltramp32)
        .code32
.Ltramp32:
        mov     $TSEL_DATA, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $0x620, %eax                   /* OSXMMEXCPT | OSFXSR | PAE, as vcpu/long_mode.h */
        mov     %eax, %cr4
        mov     $GUEST_PML4_GPA, %eax
        mov     %eax, %cr3
        mov     $0xc0000080, %ecx              /* IA32_EFER */
        rdmsr
        or      $0x901, %eax                   /* NXE | LME | SCE; LMA follows from CR0.PG */
        wrmsr
        mov     $0x80050033, %eax              /* PG | AM | WP | NE | ET | MP | PE */
        mov     %eax, %cr0
        ljmpl   $TSEL_CODE64, $TRAMP(.Ltramp64)
        .code64
.Ltramp64:
        /* The VMM's GDT has the same descriptors at 0x08 / 0x10: CS (loaded by the far jump above) stays valid, and
           no stack is needed (the APs share this page and have none yet). */
        lgdt    TRAMP(.Lvmm_gdtr)
        mov     $TSEL_DATA, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     %eax, %fs
        mov     %eax, %gs
        mov     $1, %eax
        cpuid
        shr     $24, %ebx                      /* initial APIC ID (vcpu/long_mode.cc CpuidForVcpu sets it) */
        mov     $GUEST_BOOTINFO_GPA, %esi
        mov     GUEST_BI_NUM_VCPUS(%rsi), %ecx
        xor     %edi, %edi
1:      cmp     %ecx, %edi
        jae     2f                             /* no index: enter with index = num_vcpus, _start reports it */
        cmp     GUEST_BI_APIC_IDS(%rsi,%rdi,4), %ebx
        je      2f
        inc     %edi
        jmp     1b
2:      mov     $_start, %eax
        jmp     *%rax
        .balign 8
.Ltramp_gdt:
        .quad   0
        .quad   0x00af9a000000ffff             /* 0x08: 64-bit code, DPL 0 (as the VMM's) */
        .quad   0x00cf92000000ffff             /* 0x10: data, 4 GiB */
        .quad   0x00cf9a000000ffff             /* 0x18: 32-bit code, 4 GiB */
.Ltramp_gdtr:
        .word   4 * 8 - 1
        .long   TRAMP(.Ltramp_gdt)
        .balign 8
.Lvmm_gdtr:
        .word   5 * 8 - 1                      /* null, code64, data, 16-byte TSS descriptor */
        .quad   GUEST_GDT_GPA
        .globl  aggvm_trampoline_end
aggvm_trampoline_end:

        .section .note.GNU-stack, "", @progbits
