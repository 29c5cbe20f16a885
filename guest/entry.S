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
   gets the spare area, where guest_main reports the bad index) and call guest_main(index, bootinfo). */
_start:
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

        .section .note.GNU-stack, "", @progbits
