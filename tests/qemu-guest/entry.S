/*
 * Start-up of the test guest: real mode to flat 32-bit protected mode,
 * a stack per vCPU, then guest_main(apic_id). The bootstrap vCPU comes in
 * through the reset vector, the others through a SIPI with vector 0xf0;
 * both run from CS base 0xf0000, where guest.ld puts ap_entry.
 */
    .section .reset, "ax"
    .code16
reset_vector:
    ljmp $0xf000, $0                /* ap_entry */
    .fill 16 - (. - reset_vector), 1, 0xf4

    .section .ap_entry, "ax"
    .code16
    .globl ap_entry
ap_entry:
    cli
    cld
    lgdtl %cs:(gdt_desc - ap_entry)
    movl %cr0, %eax
    andl $~0x60000000, %eax         /* caches on: CD and NW off */
    orl $1, %eax                    /* PE */
    movl %eax, %cr0
    ljmpl $0x08, $entry32

    .balign 8
gdt:
    /*
     * Accessed bits preset: the GDT is in ROM, where the CPU cannot set
     * them, and would retry the segment load for ever.
     */
    .quad 0                         /* null */
    .quad 0x00cf9b000000ffff        /* 0x08: code, flat, 32-bit */
    .quad 0x00cf93000000ffff        /* 0x10: data, flat */
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt

    .section .text, "ax"
    .code32
entry32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    /* The initial APIC ID: CPUID leaf 1, EBX[31:24] */
    movl $1, %eax
    cpuid
    shrl $24, %ebx
    /* 4 KiB of stack each, below 0x80000 */
    movl %ebx, %eax
    shll $12, %eax
    movl $0x80000, %esp
    subl %eax, %esp
    pushl %ebx
    call guest_main
1:  cli
    hlt
    jmp 1b

    .section .note.GNU-stack, "", @progbits
