/*
 * dirtier: ferry's dirty-page test guest (GNU as, x86-64, PVH boot).
 *
 * Boot: 32-bit PVH entry -> long mode (identity map of 64 GiB with 2 MiB
 * pages) -> GDT, TSS, IDT -> iretq to ring 3 (IOPL 3, IF 0). Ring-0 code is
 * a few thousand instructions because nested KVM emulates ring 0; all real
 * work (finishing the identity map, parsing, fill, sweeps) runs in ring 3.
 *
 * The memory contract (header at 0x100000, page contents, command line) is
 * documented in ../src/lib.rs and checked by the oracle there; keep both in
 * step. Plain `as`, no C preprocessor: comments are C-style or `#`.
 */

        .set HDR, 0x100000                  # header page (first page of the image)
        .set HDR_MAGIC, HDR + 0
        .set HDR_VERSION, HDR + 8
        .set HDR_WS_PAGES, HDR + 16
        .set HDR_STRIDE, HDR + 24
        .set HDR_PASSES, HDR + 32
        .set HDR_FILL, HDR + 40
        .set HDR_FILL_DONE, HDR + 48
        .set HDR_TSC_KHZ, HDR + 56
        .set HDR_NRANGES, HDR + 64
        .set HDR_RANGES, HDR + 72

        .set USABLE_START, 0x200000         # guest data RAM starts at 2 MiB
        .set MAX_RANGES, 8
        .set MAP_LIMIT, 0x1000000000        # 64 GiB identity map
        .set MAP_PDS, 64                    # one page directory per GiB

        .set COM1, 0x3f8
        .set PDE_2M, 0x87                   # P | RW | US | PS
        .set PTE_TABLE, 0x07                # P | RW | US

        .set SEL_KCODE, 0x08
        .set SEL_KDATA, 0x10
        .set SEL_UDATA, 0x18 | 3
        .set SEL_UCODE, 0x20 | 3
        .set SEL_TSS, 0x28

        .set HVM_START_MAGIC, 0x336ec578
        .set E820_RAM, 1
        .set DEFAULT_TSC_KHZ, 2000000
        .set HB_EVERY_PAGES_MASK, 63        # heartbeat check every 64 pages

/* ------------------------------------------------------------------------ */
/* Header page: written by the guest at boot, magic last.                    */

        .section .header, "aw"
        .globl dirtier_header
dirtier_header:
        .fill 4096, 1, 0

/* ------------------------------------------------------------------------ */
/* PVH entry note. The 4-byte descriptor is followed by an empty note so the */
/* 4 bytes after it are zero: QEMU reads the descriptor as a native size_t.  */

        .section .note.Xen, "a", @note
        .balign 4
        .long 4                             # n_namesz
        .long 4                             # n_descsz
        .long 18                            # XEN_ELFNOTE_PHYS32_ENTRY
        .asciz "Xen"
        .long pvh_entry
        .long 0, 0, 0                       # empty note (namesz 0, descsz 0, type 0)

/* ------------------------------------------------------------------------ */
/* Ring 0: 32-bit entry, long mode switch, descriptor tables.                */

        .section .text.entry, "ax"
        .code32
        .globl pvh_entry
pvh_entry:
        cli
        cld
        movl %ebx, start_info_pa
        movl $kstack_top, %esp

        /* PML4 and PDPT: clear, then PML4[0] -> PDPT, PDPT[k] -> PD k. */
        xorl %eax, %eax
        movl $pml4, %edi
        movl $2048, %ecx                    # two pages of dwords
        rep stosl
        movl $(pdpt + PTE_TABLE), pml4
        movl $pdpt, %edi
        movl $(pds + PTE_TABLE), %eax
        movl $MAP_PDS, %ecx
1:      movl %eax, (%edi)
        addl $4096, %eax
        addl $8, %edi
        decl %ecx
        jnz 1b

        /* PD 0 maps the first GiB; ring 3 fills PDs 1..63 itself. */
        movl $pds, %edi
        movl $PDE_2M, %eax
        movl $512, %ecx
2:      movl %eax, (%edi)
        movl $0, 4(%edi)
        addl $0x200000, %eax
        addl $8, %edi
        decl %ecx
        jnz 2b

        lgdtl gdt_ptr
        movl %cr4, %eax
        orl $0x20, %eax                     # PAE
        andl $~0x4, %eax                    # TSD off: rdtsc allowed in ring 3
        movl %eax, %cr4
        movl $pml4, %eax
        movl %eax, %cr3
        movl $0xc0000080, %ecx              # EFER
        rdmsr
        orl $0x100, %eax                    # LME
        wrmsr
        movl %cr0, %eax
        orl $0x80010001, %eax               # PG | WP | PE
        andl $~0x60000000, %eax             # caches on (CD, NW off)
        movl %eax, %cr0
        ljmp $SEL_KCODE, $long_entry

        .code64
long_entry:
        movl $SEL_KDATA, %eax
        movl %eax, %ds
        movl %eax, %es
        movl %eax, %ss
        movl %eax, %fs
        movl %eax, %gs
        movq $kstack_top, %rsp

        /* TSS: base into its GDT descriptor, RSP0 = kernel stack. */
        movq $tss, %rax
        movw %ax, gdt_tss + 2
        shrq $16, %rax
        movb %al, gdt_tss + 4
        movb %ah, gdt_tss + 7
        movq $kstack_top, %rax
        movq %rax, tss + 4
        movl $SEL_TSS, %eax
        ltr %ax

        /* IDT: 32 interrupt gates, one 16-byte stub each. */
        movq $idt, %rdi
        movq $exc_stubs, %rsi
        xorl %ecx, %ecx
3:      movq %rsi, %rax
        movw %ax, (%rdi)
        movw $SEL_KCODE, 2(%rdi)
        movw $0x8e00, 4(%rdi)               # present, DPL 0, 64-bit interrupt gate
        shrq $16, %rax
        movw %ax, 6(%rdi)
        shrq $16, %rax
        movl %eax, 8(%rdi)
        movl $0, 12(%rdi)
        addq $16, %rdi
        addq $16, %rsi
        incl %ecx
        cmpl $32, %ecx
        jb 3b
        lidt idt_ptr

        /* Enter ring 3: RFLAGS = IOPL 3, IF 0. IOPL is also set here with   */
        /* popfq: some emulated iretq implementations keep the old IOPL.     */
        pushq $0x3002
        popfq
        pushq $SEL_UDATA
        pushq $ustack_top
        pushq $0x3002
        pushq $SEL_UCODE
        pushq $user_main
        iretq

/* Exception stubs: push a dummy error code where the CPU pushes none, then  */
/* the vector; the common handler prints "EXC <vector>\n" and halts.         */
        .balign 16
exc_stubs:
        .set vec, 0
        .rept 32
        .balign 16
        .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
        nop
        nop
        .else
        pushq $0
        .endif
        pushq $vec
        jmp exc_common
        .set vec, vec + 1
        .endr

exc_common:
        leaq msg_exc(%rip), %rsi
        call puts
        movq (%rsp), %rax
        call print_dec
        movb $'\n', %al
        call putc
4:      cli
        hlt
        jmp 4b

/* ------------------------------------------------------------------------ */
/* Serial output (COM1, polled). Usable from ring 0 and ring 3 (IOPL 3).     */

/* putc: write %al. Clobbers %edx. */
putc:
        pushq %rcx
        pushq %rax
        movl $(COM1 + 5), %edx
        movl $100000, %ecx
1:      inb %dx, %al
        testb $0x20, %al                    # THR empty
        jnz 2f
        pause
        decl %ecx
        jnz 1b
2:      popq %rax
        movl $COM1, %edx
        outb %al, %dx
        popq %rcx
        ret

/* puts: write the NUL-terminated string at %rsi. Clobbers %rax, %rdx, %rsi. */
puts:
1:      movb (%rsi), %al
        testb %al, %al
        jz 2f
        call putc
        incq %rsi
        jmp 1b
2:      ret

/* print_dec: write %rax in decimal. Clobbers %rax, %rcx, %rdx, %rsi, %rdi. */
print_dec:
        subq $32, %rsp
        leaq 31(%rsp), %rdi
        movb $0, (%rdi)
        movl $10, %ecx
1:      xorl %edx, %edx
        divq %rcx
        addb $'0', %dl
        decq %rdi
        movb %dl, (%rdi)
        testq %rax, %rax
        jnz 1b
        movq %rdi, %rsi
        call puts
        addq $32, %rsp
        ret

/* hb_poll: write '.' if >= hb_ticks TSC ticks passed since the last one.    */
/* Clobbers %rax and %rdx only.                                              */
hb_poll:
        cmpq $0, hb_ticks(%rip)
        je 1f
        rdtsc
        shlq $32, %rdx
        orq %rax, %rdx
        movq %rdx, %rax
        subq last_hb(%rip), %rax
        cmpq hb_ticks(%rip), %rax
        jb 1f
        movq %rdx, last_hb(%rip)
        movb $'.', %al
        call putc
1:      ret

/* rdtsc64: %rax = TSC. Clobbers %rdx. */
rdtsc64:
        rdtsc
        shlq $32, %rdx
        orq %rdx, %rax
        ret

/* ------------------------------------------------------------------------ */
/* Ring 3.                                                                   */

user_main:
        /* Finish the identity map: PDs 1..63 (1 GiB .. 64 GiB). They were   */
        /* not present before, so no TLB flush is needed.                    */
        leaq pds + 4096(%rip), %rdi
        movl $(0x40000000 | PDE_2M), %eax
        movl $((MAP_PDS - 1) * 512), %ecx
1:      movq %rax, (%rdi)
        addq $0x200000, %rax
        addq $8, %rdi
        decl %ecx
        jnz 1b

        call rdtsc64
        movq %rax, last_hb(%rip)

        /* struct hvm_start_info */
        movl start_info_pa(%rip), %ebx
        cmpl $HVM_START_MAGIC, (%rbx)
        je 2f
        leaq msg_no_start_info(%rip), %rsi
        call puts
        jmp 3f
2:      cmpl $1, 4(%rbx)                    # version >= 1 has the memmap
        jb 5f
        movq 40(%rbx), %rsi
        movl 48(%rbx), %ecx
        call build_ranges
5:      movq 24(%rbx), %rsi
        testq %rsi, %rsi
        jz 3f
        call parse_cmdline
3:
        call compute_ws
        call compute_stride
        call compute_tsc_khz

        movq tsc_khz(%rip), %rax
        mulq hb_ms(%rip)
        movq %rax, hb_ticks(%rip)
        movq tsc_khz(%rip), %rax
        mulq pause_ms(%rip)
        movq %rax, pause_ticks(%rip)

        call write_header

        leaq msg_ws(%rip), %rsi
        call puts
        movq ws_pages(%rip), %rax
        call print_dec
        leaq msg_stride(%rip), %rsi
        call puts
        movq stride(%rip), %rax
        call print_dec
        leaq msg_fill(%rip), %rsi
        call puts
        movq fill(%rip), %rax
        call print_dec
        movb $'\n', %al
        call putc

        cmpq $0, fill(%rip)
        je 4f
        call do_fill
        movq $1, HDR_FILL_DONE
4:
        leaq msg_ready(%rip), %rsi
        call puts

        movq ws_pages(%rip), %r8            # N
        testq %r8, %r8
        jz idle
        movq stride(%rip), %r9              # s
        leaq rtab(%rip), %r12               # index -> GPA table
        movl $1, %r10d                      # pass p

pass_loop:
        xorl %ecx, %ecx                     # sweep index j
        xorl %r11d, %r11d                   # page index i = j * s mod N
page_loop:
        movq %r12, %rsi
1:      cmpq (%rsi), %r11                   # i < cumulative end of this range?
        jb 2f
        addq $16, %rsi
        jmp 1b
2:      movq %r11, %rdi
        shlq $12, %rdi
        addq 8(%rsi), %rdi                  # GPA
        movq %r10, 4088(%rdi)               # tail first: an in-flight page
        movq %rdi, 8(%rdi)                  # shows tail = p, head = p - 1
        movq %r10, (%rdi)
        addq %r9, %r11
        cmpq %r8, %r11
        jb 3f
        subq %r8, %r11
3:      incq %rcx
        testl $HB_EVERY_PAGES_MASK, %ecx
        jnz 4f
        call hb_poll
4:      cmpq %r8, %rcx
        jb page_loop

        movq %r10, HDR_PASSES
        cmpq exit_after(%rip), %r10
        jne 5f
        call guest_exit
5:      incq %r10
        call pause_wait
        jmp pass_loop

/* guest_exit: after `poweroff=N` or `reset=N` passes, power off through the ACPI PM1a
   control port (SLP_EN) or reset through port 0xcf9; never returns. */
guest_exit:
        cmpq $0, exit_reset(%rip)
        jne 1f
        movw $0x604, %dx
        movw $0x2000, %ax
        outw %ax, %dx
        jmp 2f
1:      movw $0xcf9, %dx
        movb $0x06, %al
        outb %al, %dx
2:      pause
        jmp 2b

idle:
        call hb_poll
        pause
        jmp idle

/* pause_wait: busy-wait pause_ticks, with heartbeats. Clobbers rax, rdx, r13. */
pause_wait:
        cmpq $0, pause_ticks(%rip)
        je 2f
        call rdtsc64
        movq %rax, %r13
1:      call hb_poll
        pause
        call rdtsc64
        subq %r13, %rax
        cmpq pause_ticks(%rip), %rax
        jb 1b
2:      ret

/* do_fill: fill signature into usable pages ws_pages .. total_pages-1. */
do_fill:
        movq ws_pages(%rip), %rcx
        movq total_pages(%rip), %r8
        movabsq $0x4c49465952524546, %r9    # "FERRYFIL"
        leaq rtab(%rip), %r12
        cmpq %r8, %rcx
        jae 5f
1:      movq %r12, %rsi
2:      cmpq (%rsi), %rcx
        jb 3f
        addq $16, %rsi
        jmp 2b
3:      movq %rcx, %rdi
        shlq $12, %rdi
        addq 8(%rsi), %rdi                  # GPA
        movq %rdi, %rax
        notq %rax
        movq %r9, 8(%rdi)
        movq %rax, 4088(%rdi)
        movq %rdi, (%rdi)
        incq %rcx
        testl $HB_EVERY_PAGES_MASK, %ecx
        jnz 4f
        call hb_poll
4:      cmpq %r8, %rcx
        jb 1b
5:      ret

/* build_ranges: %rsi = memmap, %ecx = entries. Fills ranges[], rtab[],      */
/* nranges and total_pages. Preserves %rbx.                                  */
build_ranges:
        leaq ranges(%rip), %rdi
        xorl %r8d, %r8d                     # ranges kept
        movabsq $MAP_LIMIT, %r11
        testl %ecx, %ecx
        jz 4f
1:      cmpl $E820_RAM, 16(%rsi)
        jne 3f
        movq (%rsi), %rax                   # start
        movq 8(%rsi), %rdx
        addq %rax, %rdx                     # end
        jc 3f
        cmpq $USABLE_START, %rax
        jae 2f
        movl $USABLE_START, %eax
2:      addq $4095, %rax
        andq $~4095, %rax
        cmpq %r11, %rdx
        jbe 6f
        movq %r11, %rdx
6:      andq $~4095, %rdx
        cmpq %rax, %rdx
        jbe 3f
        cmpl $MAX_RANGES, %r8d
        jae 4f
        subq %rax, %rdx
        movq %rax, (%rdi)
        movq %rdx, 8(%rdi)
        addq $16, %rdi
        incl %r8d
3:      addq $24, %rsi
        decl %ecx
        jnz 1b
4:      movq %r8, nranges(%rip)

        /* insertion sort by start (at most 8 entries) */
        movl $1, %r9d
7:      cmpq %r8, %r9
        jae 10f
        movq %r9, %r10
8:      testq %r10, %r10
        jz 9f
        leaq ranges(%rip), %rsi
        movq %r10, %rax
        shlq $4, %rax
        addq %rax, %rsi                     # &ranges[k]
        movq (%rsi), %rax
        cmpq -16(%rsi), %rax
        jae 9f
        movq -16(%rsi), %rdx
        movq %rax, -16(%rsi)
        movq %rdx, (%rsi)
        movq 8(%rsi), %rax
        movq -8(%rsi), %rdx
        movq %rax, -8(%rsi)
        movq %rdx, 8(%rsi)
        decq %r10
        jmp 8b
9:      incq %r9
        jmp 7b
10:
        /* rtab[k] = { cumulative end page, start - cumulative start * 4096 } */
        leaq ranges(%rip), %rsi
        leaq rtab(%rip), %rdi
        xorl %eax, %eax                     # cumulative pages
        movq %r8, %rcx
        testq %rcx, %rcx
        jz 12f
11:     movq (%rsi), %rdx
        movq %rax, %r9
        shlq $12, %r9
        subq %r9, %rdx
        movq %rdx, 8(%rdi)
        movq 8(%rsi), %rdx
        shrq $12, %rdx
        addq %rdx, %rax
        movq %rax, (%rdi)
        addq $16, %rsi
        addq $16, %rdi
        decq %rcx
        jnz 11b
12:     movq %rax, total_pages(%rip)
        ret

/* match_key: if the string at %rdi (NUL-terminated) prefixes %rsi, advance */
/* %rsi past it and set ZF; else ZF clear, %rsi unchanged. Clobbers rax,    */
/* rdx, rdi.                                                                 */
match_key:
        movq %rsi, %rdx
1:      movb (%rdi), %al
        testb %al, %al
        jz 2f
        cmpb (%rdx), %al
        jne 3f
        incq %rdi
        incq %rdx
        jmp 1b
2:      movq %rdx, %rsi
        xorl %eax, %eax                     # ZF = 1
3:      ret

/* parse_u64: decimal digits at %rsi -> %rax, %rsi past them. Clobbers rcx. */
parse_u64:
        xorl %eax, %eax
1:      movzbl (%rsi), %ecx
        subl $'0', %ecx
        cmpl $9, %ecx
        ja 2f
        imulq $10, %rax
        addq %rcx, %rax
        incq %rsi
        jmp 1b
2:      ret

/* parse_cmdline: %rsi = NUL-terminated command line. Preserves %rbx. */
parse_cmdline:
tok:
        movzbl (%rsi), %eax
        testl %eax, %eax
        jz done_cmdline
        cmpl $' ', %eax
        ja key
        incq %rsi
        jmp tok
key:
        leaq key_ws(%rip), %rdi
        call match_key
        jne 1f
        call parse_u64
        movzbl (%rsi), %ecx
        orl $0x20, %ecx                     # lower case
        movl $10, %edx
        cmpl $'k', %ecx
        je 5f
        movl $20, %edx
        cmpl $'m', %ecx
        je 5f
        movl $30, %edx
        cmpl $'g', %ecx
        je 5f
        movq $0, ws_percent(%rip)
        cmpb $'%', (%rsi)
        jne 6f
        movq $1, ws_percent(%rip)
        jmp 6f
5:      movl %edx, %ecx
        shlq %cl, %rax
        movq $0, ws_percent(%rip)
6:      movq %rax, ws_value(%rip)
        jmp skip
1:      leaq key_pattern_random(%rip), %rdi
        call match_key
        jne 1f
        movq $1, random(%rip)
        jmp skip
1:      leaq key_pattern_seq(%rip), %rdi
        call match_key
        jne 1f
        movq $0, random(%rip)
        jmp skip
1:      leaq key_pause(%rip), %rdi
        call match_key
        jne 1f
        call parse_u64
        movq %rax, pause_ms(%rip)
        jmp skip
1:      leaq key_hb(%rip), %rdi
        call match_key
        jne 1f
        call parse_u64
        movq %rax, hb_ms(%rip)
        jmp skip
1:      leaq key_poweroff(%rip), %rdi
        call match_key
        jne 1f
        call parse_u64
        movq %rax, exit_after(%rip)
        movq $0, exit_reset(%rip)
        jmp skip
1:      leaq key_reset(%rip), %rdi
        call match_key
        jne 1f
        call parse_u64
        movq %rax, exit_after(%rip)
        movq $1, exit_reset(%rip)
        jmp skip
1:      leaq key_fill(%rip), %rdi
        call match_key
        jne skip
        call parse_u64
        xorl %ecx, %ecx
        testq %rax, %rax
        setnz %cl
        movq %rcx, fill(%rip)
skip:
        movzbl (%rsi), %eax
        cmpl $' ', %eax
        jbe tok
        incq %rsi
        jmp skip
done_cmdline:
        ret

/* compute_ws: ws_pages from ws_value/ws_percent, clamped to total_pages. */
compute_ws:
        movq ws_value(%rip), %rax
        cmpq $0, ws_percent(%rip)
        je 1f
        cmpq $100, %rax
        jbe 2f
        movl $100, %eax
2:      mulq total_pages(%rip)
        movl $100, %ecx
        divq %rcx
        jmp 3f
1:      shrq $12, %rax
3:      cmpq total_pages(%rip), %rax
        jbe 4f
        movq total_pages(%rip), %rax
4:      movq %rax, ws_pages(%rip)
        ret

/* compute_stride: 1 for seq or N <= 1; else the first s >= 0.618 N with */
/* gcd(s, N) == 1 (s = N - 1 always qualifies, so s < N).                 */
compute_stride:
        movl $1, %eax
        movq ws_pages(%rip), %r8
        cmpq $0, random(%rip)
        je 9f
        cmpq $1, %r8
        jbe 9f
        movq %r8, %rax
        movl $618, %ecx
        mulq %rcx
        movl $1000, %ecx
        divq %rcx
        testq %rax, %rax
        jnz 1f
        movl $1, %eax
1:      movq %rax, %r11                     # candidate s
        movq %rax, %r9                      # gcd(s, N) by Euclid in r9/r10
        movq %r8, %r10
2:      movq %r9, %rax
        xorl %edx, %edx
        divq %r10
        movq %r10, %r9
        movq %rdx, %r10
        testq %r10, %r10
        jnz 2b
        movq %r11, %rax
        cmpq $1, %r9
        je 9f
        incq %rax
        jmp 1b
9:      movq %rax, stride(%rip)
        ret

/* compute_tsc_khz: CPUID 0x40000010, else 0x15, else 0x16, else default. */
compute_tsc_khz:
        pushq %rbx
        movl $1, %eax
        cpuid
        btl $31, %ecx                       # hypervisor present
        jnc 1f
        movl $0x40000000, %eax
        cpuid
        cmpl $0x40000010, %eax
        jb 1f
        movl $0x40000010, %eax
        cpuid
        testl %eax, %eax
        jz 1f
        movl %eax, %eax
        jmp 8f
1:      xorl %eax, %eax
        cpuid
        movl %eax, %esi                     # max basic leaf
        cmpl $0x15, %esi
        jb 3f
        movl $0x15, %eax
        xorl %ecx, %ecx
        cpuid
        testl %eax, %eax
        jz 2f
        testl %ebx, %ebx
        jz 2f
        testl %ecx, %ecx
        jz 2f
        movl %eax, %edi                     # denominator
        movl %ecx, %eax                     # crystal Hz
        movl %ebx, %ecx
        mulq %rcx                           # Hz * numerator
        divq %rdi
        xorl %edx, %edx
        movl $1000, %ecx
        divq %rcx
        testq %rax, %rax
        jnz 8f
2:      cmpl $0x16, %esi
        jb 3f
        movl $0x16, %eax
        cpuid
        andl $0xffff, %eax                  # base MHz
        jz 3f
        imull $1000, %eax, %eax
        jmp 8f
3:      movl $DEFAULT_TSC_KHZ, %eax
8:      movq %rax, tsc_khz(%rip)
        popq %rbx
        ret

/* write_header: all fields, magic last. */
write_header:
        movq $1, HDR_VERSION
        movq ws_pages(%rip), %rax
        movq %rax, HDR_WS_PAGES
        movq stride(%rip), %rax
        movq %rax, HDR_STRIDE
        movq $0, HDR_PASSES
        movq fill(%rip), %rax
        movq %rax, HDR_FILL
        movq $0, HDR_FILL_DONE
        movq tsc_khz(%rip), %rax
        movq %rax, HDR_TSC_KHZ
        movq nranges(%rip), %rcx
        movq %rcx, HDR_NRANGES
        shlq $1, %rcx                       # two u64 per range
        leaq ranges(%rip), %rsi
        movq $HDR_RANGES, %rdi
        rep movsq
        movabsq $0x5452445952524546, %rax   # "FERRYDRT"
        movq %rax, HDR_MAGIC
        ret

/* ------------------------------------------------------------------------ */

        .section .rodata
msg_exc:                .asciz "EXC "
msg_no_start_info:      .asciz "dirtier: no PVH start info, idling\n"
msg_ws:                 .asciz "dirtier: ws="
msg_stride:             .asciz " stride="
msg_fill:               .asciz " fill="
msg_ready:              .asciz "dirtier: ready\n"
key_ws:                 .asciz "ws="
key_pattern_random:     .asciz "pattern=random"
key_pattern_seq:        .asciz "pattern=seq"
key_pause:              .asciz "pause="
key_hb:                 .asciz "hb="
key_fill:               .asciz "fill="
key_poweroff:           .asciz "poweroff="
key_reset:              .asciz "reset="

        .section .data
        .balign 16
gdt:
        .quad 0
        .quad 0x00af9a000000ffff            # 0x08 kernel code, 64-bit
        .quad 0x00cf92000000ffff            # 0x10 kernel data
        .quad 0x00cff2000000ffff            # 0x18 user data (DPL 3)
        .quad 0x00affa000000ffff            # 0x20 user code, 64-bit (DPL 3)
gdt_tss:                                    # 0x28 64-bit TSS; base set at boot
        .word tss_end - tss - 1, 0
        .byte 0, 0x89, 0, 0
        .long 0, 0
gdt_end:
        .balign 8
        .word 0
gdt_ptr:
        .word gdt_end - gdt - 1
        .quad gdt
        .balign 8
        .word 0
idt_ptr:
        .word 32 * 16 - 1
        .quad idt
        .balign 16
tss:
        .fill 102, 1, 0
        .word tss_iobitmap - tss
        /* I/O bitmap: the ports ring 3 may use even without IOPL: COM1 (0x3f8-0x3ff),
           the ACPI PM1a control word (0x604-0x605, poweroff) and the reset control
           register (0xcf9). */
tss_iobitmap:
        .fill 0x3f8 / 8, 1, 0xff            # 0x000-0x3f7
        .byte 0                             # 0x3f8-0x3ff
        .fill (0x600 - 0x400) / 8, 1, 0xff  # 0x400-0x5ff
        .byte 0xcf                          # 0x600-0x607: 0x604, 0x605 open
        .fill (0xcf8 - 0x608) / 8, 1, 0xff  # 0x608-0xcf7
        .byte 0xfd                          # 0xcf8-0xcff: 0xcf9 open
        .byte 0xff                          # required terminator byte
tss_end:

        .balign 8
start_info_pa:  .quad 0
ws_value:       .quad 0
ws_percent:     .quad 0
random:         .quad 0
pause_ms:       .quad 0
hb_ms:          .quad 1
fill:           .quad 0
exit_after:     .quad 0
exit_reset:     .quad 0
ws_pages:       .quad 0
stride:         .quad 1
tsc_khz:        .quad 0
hb_ticks:       .quad 0
pause_ticks:    .quad 0
last_hb:        .quad 0
total_pages:    .quad 0
nranges:        .quad 0
ranges:         .fill 2 * MAX_RANGES, 8, 0
rtab:           .fill 2 * MAX_RANGES, 8, 0

        .section .bss
        .balign 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pds:    .skip 4096 * MAP_PDS
idt:    .skip 32 * 16
        .balign 16
kstack: .skip 8192
kstack_top:
ustack: .skip 16384
ustack_top:
