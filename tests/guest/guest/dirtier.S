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

/* hb_poll: once >= poll_ticks TSC ticks passed since the last time: write  */
/* '.' (hb > 0) and, with the ACPI PM block found (acpi=1), check the power  */
/* button. poll_ticks is hb_ticks, or 10 ms when hb=0 with ACPI.             */
/* Clobbers %rax and %rdx only.                                              */
hb_poll:
        cmpq $0, poll_ticks(%rip)
        je 1f
        rdtsc
        shlq $32, %rdx
        orq %rax, %rdx
        movq %rdx, %rax
        subq last_hb(%rip), %rax
        cmpq poll_ticks(%rip), %rax
        jb 1f
        movq %rdx, last_hb(%rip)
        cmpq $0, hb_ticks(%rip)
        je 2f
        movb $'.', %al
        call putc
2:      cmpw $0, pm_base(%rip)
        jne acpi_poll                       # tail call
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
        movq %rax, poll_ticks(%rip)
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

        cmpq $0, acpi_on(%rip)
        je 3f
        call acpi_init
3:
        cmpq $0, fill(%rip)
        je 4f
        call do_fill
        movq $1, HDR_FILL_DONE
4:
        cmpq $0, blkbench_mib(%rip)
        je 5f
        cmpq $0, blk_k(%rip)                # blkbench= drives the disk: blk=1 at least
        jne 5f
        movq $1, blk_k(%rip)
5:      cmpq $0, blk_k(%rip)
        je 6f
        call blk_init
        cmpq $0, blkbench_mib(%rip)
        je 6f
        call blk_bench
6:      cmpq $0, net_on(%rip)
        je 7f
        call net_init
7:      cmpq $0, rng_on(%rip)
        je 8f
        call rng_init
8:      cmpq $0, balloon_on(%rip)
        je 9f
        call balloon_init
9:      cmpq $0, cd_on(%rip)
        je 10f
        call cdrom_init
10:
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

        call io_pass                        # virtio disk record, frames (blk=, net=)
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
        jne 1f
        call parse_u64
        xorl %ecx, %ecx
        testq %rax, %rax
        setnz %cl
        movq %rcx, fill(%rip)
        jmp skip
1:      leaq key_blkbench(%rip), %rdi
        call match_key
        jne 1f
        call parse_u64
        movq %rax, blkbench_mib(%rip)
        orl $1 << 9, blk_dev + VD_FEAT_LO(%rip)   # VIRTIO_BLK_F_FLUSH: a write-back cache
        jmp skip
1:      leaq key_blk(%rip), %rdi
        call match_key
        jne 1f
        call parse_u64
        movq %rax, blk_k(%rip)
        jmp skip
1:      leaq key_net(%rip), %rdi
        call match_key
        jne 1f
        call parse_u64
        xorl %ecx, %ecx
        testq %rax, %rax
        setnz %cl
        movq %rcx, net_on(%rip)
        jmp skip
1:      leaq key_cdrom(%rip), %rdi
        call match_key
        jne 1f
        call parse_u64
        movq %rax, cd_lba(%rip)
        movq $1, cd_on(%rip)
        jmp skip
1:      leaq key_acpi(%rip), %rdi
        call match_key
        jne 1f
        call parse_u64
        xorl %ecx, %ecx
        testq %rax, %rax
        setnz %cl
        movq %rcx, acpi_on(%rip)
        jmp skip
1:      leaq key_rng(%rip), %rdi
        call match_key
        jne 1f
        call parse_u64
        xorl %ecx, %ecx
        testq %rax, %rax
        setnz %cl
        movq %rcx, rng_on(%rip)
        jmp skip
1:      leaq key_balloon(%rip), %rdi
        call match_key
        jne skip
        call parse_u64
        xorl %ecx, %ecx
        testq %rax, %rax
        setnz %cl
        movq %rcx, balloon_on(%rip)
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
/* ACPI power button (acpi=1), ring 3, polled, as an OS on QEMU's `pc` does  */
/* with what SeaBIOS leaves: the PIIX4 PM function at 00:01.3 (8086:7113),   */
/* its PM I/O block at PMBA (config 0x40, bits 15:6) when PMREGMISC (config  */
/* 0x80) bit 0 is set: PM1_STS +0, PM1_EN +2, PM1_CNT +4, PM_TMR +8.         */

        .set PIIX4_PM_CFG, 0x80000000 | (1 << 11) | (3 << 8)   # 00:01.3
        .set PIIX4_PM_ID, 0x71138086
        .set PM1_STS, 0
        .set PM1_EN, 2
        .set PM1_CNT, 4
        .set PWRBTN, 1 << 8                 # PWRBTN_STS / PWRBTN_EN
        .set SCI_EN, 1 << 0
        .set SLP_TYP_MASK, 7 << 10
        .set SLP_TYP_S5, 0                  # QEMU's \_S5 package: { 0, 0, 0, 0 }
        .set SLP_EN, 1 << 13
        .set SMI_CMD, 0xb2
        .set ACPI_ENABLE, 0xf1
        .set SCI_EN_WAIT_MS, 1000

/* acpi_init: find the PM block, open it in the TSS I/O bitmap, turn ACPI on */
/* (ACPI_ENABLE to SMI_CMD when SCI_EN is clear, bounded wait for SCI_EN),   */
/* clear a stale PWRBTN_STS, set PWRBTN_EN; then hb_poll checks the button.  */
/* Without the block it says why and the guest carries on without ACPI.      */
/* Preserves %rbx.                                                           */
acpi_init:
        pushq %rbx
        movl $PIIX4_PM_CFG, %edi
        xorl %ecx, %ecx
        call pci_rd
        leaq msg_acpi_nopm(%rip), %rsi
        cmpl $PIIX4_PM_ID, %eax
        jne 9f
        movl $0x80, %ecx                    # PMREGMISC
        call pci_rd
        leaq msg_acpi_off(%rip), %rsi
        testb $1, %al                       # PM I/O enabled
        jz 9f
        movl $0x40, %ecx                    # PMBA
        call pci_rd
        andl $0xffc0, %eax
        jz 9f
        movl %eax, %ebx                     # base
        /* Ring 3 uses the bitmap (IOPL 3 does not hold under nested KVM):   */
        /* open the 64-port block, 64-aligned: 8 bitmap bytes.               */
        shrl $3, %eax
        leaq tss_iobitmap(%rip), %rdi
        movq $0, (%rdi,%rax)
        leaq msg_acpi_pm(%rip), %rsi
        call puts
        movl $12, %ecx                      # base in hex, no leading zeros
        xorl %esi, %esi                     # a digit printed
2:      movl %ebx, %eax
        shrl %cl, %eax
        andl $0xf, %eax
        orl %eax, %esi
        jnz 5f
        testl %ecx, %ecx
        jnz 6f
5:      cmpb $10, %al
        jb 7f
        addb $('a' - '0' - 10), %al
7:      addb $'0', %al
        call putc
6:      subl $4, %ecx
        jns 2b
        movb $'\n', %al
        call putc

        leal PM1_CNT(%rbx), %edx
        inw %dx, %ax
        testw $SCI_EN, %ax
        jnz 3f
        movb $ACPI_ENABLE, %al
        outb %al, $SMI_CMD
        movq tsc_khz(%rip), %rax
        imulq $SCI_EN_WAIT_MS, %rax
        movq %rax, %r8
        call rdtsc64
        movq %rax, %r9
1:      leal PM1_CNT(%rbx), %edx
        inw %dx, %ax
        testw $SCI_EN, %ax
        jnz 3f
        pause
        call rdtsc64
        subq %r9, %rax
        cmpq %r8, %rax
        jb 1b
        leaq msg_acpi_sci(%rip), %rsi
        call puts
3:      movl %ebx, %edx                     # PM1_STS: write 1 to clear
        movw $PWRBTN, %ax
        outw %ax, %dx
        leal PM1_EN(%rbx), %edx
        inw %dx, %ax
        orw $PWRBTN, %ax
        outw %ax, %dx
        cmpq $0, poll_ticks(%rip)
        jne 4f
        movq tsc_khz(%rip), %rax            # hb=0: check every 10 ms anyway
        imulq $10, %rax
        movq %rax, poll_ticks(%rip)
4:      movw %bx, pm_base(%rip)
        popq %rbx
        ret
9:      call puts
        popq %rbx
        ret

/* acpi_poll: read PM1_STS; on PWRBTN_STS say so, clear it and enter S5 the */
/* way an OS does: SLP_TYP = S5 and SLP_EN in PM1_CNT (SCI_EN kept). If the */
/* machine stays on the guest carries on. Clobbers %rax and %rdx only.      */
acpi_poll:
        movzwl pm_base(%rip), %edx
        inw %dx, %ax
        testw $PWRBTN, %ax
        jnz 1f
        ret
1:      pushq %rsi
        leaq msg_acpi_button(%rip), %rsi
        call puts
        popq %rsi
        movzwl pm_base(%rip), %edx
        movw $PWRBTN, %ax
        outw %ax, %dx
        addl $PM1_CNT, %edx
        inw %dx, %ax
        andw $~(SLP_TYP_MASK | SLP_EN), %ax
        orw $(SLP_TYP_S5 << 10) | SLP_EN, %ax
        outw %ax, %dx
        ret

/* ------------------------------------------------------------------------ */
/* Virtio 1.0 PCI drivers (modern transport only), ring 3, polled.           */
/*                                                                          */
/* PCI configuration mechanism #1 (ports 0xcf8/0xcfc, dword accesses only),  */
/* bus 0. Each device: find it by vendor/device id, set Memory Space, Bus    */
/* Master and INTx Disable in the command register, walk the capability      */
/* list for the virtio vendor capabilities (common, notify, ISR, device      */
/* cfg; the first of each type wins), then reset, ACKNOWLEDGE, DRIVER,       */
/* features (VERSION_1, the device's required low bits, its optional ones   */
/* if offered), FEATURES_OK and re-read, config_msix_vector and              */
/* queue_msix_vector = NO_VECTOR (MSI-X                                      */
/* stays disabled), split virtqueues of min(max, 16) entries (a power of 2)  */
/* in .bss, queue_enable, DRIVER_OK. Completions are found by polling the    */
/* used ring's idx. Any failure prints "<dev>: ERR <reason>" and halts.      */

        .set BENCH_BYTES, 65536             # blkbench= request size
        .set VD_PREFIX, 0                   # struct vdev
        .set VD_CFG, 8                      # 0x80000000 | bus 0 | dev << 11 | fn << 8
        .set VD_COMMON, 16                  # = 8 + 8 * cfg_type for types 1..4
        .set VD_NOTIFY, 24
        .set VD_ISR, 32
        .set VD_DEVCFG, 40
        .set VD_NOTIFY_MULT, 48
        .set VD_ID, 56                      # vendor | device << 16
        .set VD_NQ, 64                      # queues used
        .set VD_FEAT_LO, 72                 # feature bits 0..31 required and accepted
        .set VD_POLL, 80                    # called while waiting (0 = none)
        .set VD_FEAT_OPT, 88                # bits 0..31 accepted if offered; after
                                            # vd_negotiate: the ones accepted
        .set VD_Q, 96                       # struct vq[VD_NQ], 64 bytes each
        .set Q_SIZE, 0
        .set Q_RING, 8                      # page: desc +0, avail +0x400, used +0x800
        .set Q_NOTIFY, 16                   # notify address
        .set Q_AVAIL, 24                    # next avail idx (16-bit)
        .set Q_USED, 32                     # next used idx to consume (16-bit)
        .set Q_INDEX, 40
        .set QMAX, 16

        .set CC_STATUS, 0x14                # virtio_pci_common_cfg offsets
        .set CC_GENERATION, 0x15
        .set CC_QSELECT, 0x16
        .set CC_QSIZE, 0x18

        .set NRX, 8                         # receive buffers posted
        .set RXBUF, 2048                    # bytes each (12-byte header + 1514 fit)
        .set TXLEN, 12 + 60                 # virtio_net_hdr_v1 + minimum Ethernet frame
        .set PONGQ, 16                      # pending FERRYPON replies (power of 2)
        .set IO_TIMEOUT_MS, 30000

/* pci_rd: %eax = config dword at offset %ecx of the function at %edi. */
/* Clobbers %edx.                                                       */
pci_rd:
        movl %edi, %eax
        orl %ecx, %eax
        andl $~3, %eax
        movw $0xcf8, %dx
        outl %eax, %dx
        movw $0xcfc, %dx
        inl %dx, %eax
        ret

/* pci_wr: write %eax to config dword %ecx of the function at %edi. Clobbers %edx. */
pci_wr:
        pushq %rax
        movl %edi, %eax
        orl %ecx, %eax
        andl $~3, %eax
        movw $0xcf8, %dx
        outl %eax, %dx
        popq %rax
        movw $0xcfc, %dx
        outl %eax, %dx
        ret

/* vd_fail: print "<prefix>ERR <reason at %rsi>" and stop (%r15 = device): */
/* ring 3 cannot hlt, and `int n` from ring 3 is not reliable under nested  */
/* KVM (its emulator handles software interrupts in real mode only, the     */
/* guest gets #UD), so it spins without heartbeats.                         */
/* vd_fail_num: the same with the number %rax after the reason.             */
vd_fail_num:
        movq %rax, fail_num(%rip)
        movq $1, fail_has_num(%rip)
vd_fail:
        pushq %rsi
        movq VD_PREFIX(%r15), %rsi
        call puts
        leaq msg_err(%rip), %rsi
        call puts
        popq %rsi
        call puts
        cmpq $0, fail_has_num(%rip)
        je 1f
        movq fail_num(%rip), %rax
        call print_dec
1:      movb $'\n', %al
        call putc
2:      pause
        jmp 2b

/* vd_start_wait: the current wait times out IO_TIMEOUT_MS from now. */
vd_start_wait:
        call rdtsc64
        addq io_ticks(%rip), %rax
        movq %rax, wait_until(%rip)
        ret

/* vd_wait_tick: heartbeat, pause; CF = 1 once the wait timed out. Clobbers rax, rdx. */
vd_wait_tick:
        call hb_poll
        pause
        call rdtsc64
        cmpq %rax, wait_until(%rip)
        ret

/* vd_find: set VD_CFG to the first bus-0 function with VD_ID; else fail. */
vd_find:
        xorl %ebx, %ebx                     # dev << 11 | fn << 8
1:      movl %ebx, %edi
        orl $0x80000000, %edi
        xorl %ecx, %ecx
        call pci_rd
        cmpl VD_ID(%r15), %eax
        je 4f
        testl $0x700, %ebx
        jnz 2f                              # function 1..7: next function
        cmpw $0xffff, %ax
        je 3f                               # no device
        movl $0x0c, %ecx
        call pci_rd
        btl $23, %eax                       # header type bit 7: multi-function
        jnc 3f
2:      addl $0x100, %ebx                   # next function (fn 7 carries to next device)
        jmp 5f
3:      addl $0x800, %ebx                   # next device, function 0
5:      cmpl $0x10000, %ebx
        jb 1b
        leaq err_nodev(%rip), %rsi
        jmp vd_fail
4:      movq %rdi, VD_CFG(%r15)
        ret

/* bar_addr: %esi = BAR index, %rdi = function -> %rax = BAR address (32- or */
/* 64-bit memory BAR, assigned). Clobbers rcx, rdx, rsi.                     */
bar_addr:
        pushq %rbx
        cmpl $5, %esi
        ja 9f
        leal 0x10(,%rsi,4), %ecx
        call pci_rd
        testb $1, %al                       # I/O space BAR
        jnz 9f
        movl %eax, %ebx
        andl $~0xf, %ebx
        shrl $1, %eax
        andl $3, %eax
        jz 2f                               # 32-bit BAR
        cmpl $2, %eax
        jne 9f
        cmpl $5, %esi                       # a 64-bit BAR takes two slots
        jae 9f
        addl $4, %ecx
        call pci_rd
        shlq $32, %rax
        orq %rax, %rbx
2:      testq %rbx, %rbx                    # unassigned
        jz 9f
        movq %rbx, %rax
        popq %rbx
        ret
9:      leaq err_bar(%rip), %rsi
        jmp vd_fail

/* vd_caps: walk the capability list, record each virtio structure's address. */
vd_caps:
        movq VD_CFG(%r15), %rdi
        movl $4, %ecx
        call pci_rd
        btl $20, %eax                       # status: capabilities list
        jnc 9f
        movl $0x34, %ecx
        call pci_rd
        movzbl %al, %r12d
        movl $48, %r13d                     # at most 48 capabilities (loop guard)
1:      andl $0xfc, %r12d
        jz 8f
        decl %r13d
        jz 8f
        movl %r12d, %ecx
        call pci_rd                         # cap_vndr, cap_next, cap_len, cfg_type
        movl %eax, %r14d
        shrl $8, %r14d
        andl $0xff, %r14d                   # next
        cmpb $0x09, %al                     # vendor specific
        jne 7f
        shrl $24, %eax                      # cfg_type
        cmpl $1, %eax
        jb 7f
        cmpl $4, %eax
        ja 7f
        leaq 8(%r15,%rax,8), %rbx           # its slot
        cmpq $0, (%rbx)
        jne 7f                              # the first of each type wins
        movl %eax, %r11d
        cmpl $2, %r11d                      # notify: notify_off_multiplier at +16
        jne 2f
        leal 16(%r12), %ecx
        call pci_rd
        movq %rax, VD_NOTIFY_MULT(%r15)
2:      leal 8(%r12), %ecx
        call pci_rd
        movl %eax, %r8d                     # offset
        leal 12(%r12), %ecx
        call pci_rd
        movl %eax, %r9d                     # length
        leal 4(%r12), %ecx
        call pci_rd
        movzbl %al, %esi                    # bar
        call bar_addr
        addq %r8, %rax
        movq %rax, %rdx
        addq %r9, %rdx
        movabsq $MAP_LIMIT, %rcx
        cmpq %rcx, %rdx                     # must lie in the identity map
        ja 10f
        movq %rax, (%rbx)
7:      movl %r14d, %r12d
        jmp 1b
8:      cmpq $0, VD_COMMON(%r15)
        je 9f
        cmpq $0, VD_NOTIFY(%r15)
        je 9f
        cmpq $0, VD_DEVCFG(%r15)
        je 9f
        ret
9:      leaq err_caps(%rip), %rsi
        jmp vd_fail
10:     leaq err_bar(%rip), %rsi
        jmp vd_fail

/* vd_init: %r15 = device. Everything up to (not including) DRIVER_OK; */
/* leaves %r13 = common cfg. Clobbers everything but %r15.             */
vd_init:
        call vd_negotiate
        jmp vd_queues

/* vd_negotiate: find and reset the device, negotiate features up to     */
/* FEATURES_OK; leaves %r13 = common cfg. Clobbers everything but %r15.  */
vd_negotiate:
        movq tsc_khz(%rip), %rax
        imulq $IO_TIMEOUT_MS, %rax
        movq %rax, io_ticks(%rip)
        call vd_find
        movq VD_CFG(%r15), %rdi
        movl $4, %ecx
        call pci_rd
        andl $0xffff, %eax                  # status half 0: its RW1C bits stay
        orl $0x406, %eax                    # Memory Space, Bus Master, INTx Disable
        call pci_wr
        call vd_caps
        movq VD_COMMON(%r15), %r13
        movb $0, CC_STATUS(%r13)            # reset, then wait for status 0
        call vd_start_wait
1:      testb $0xff, CC_STATUS(%r13)
        jz 2f
        call vd_wait_tick
        jnc 1b
        leaq err_reset(%rip), %rsi
        jmp vd_fail
2:      movb $1, CC_STATUS(%r13)            # ACKNOWLEDGE
        movb $3, CC_STATUS(%r13)            # DRIVER
        movl $1, 0x00(%r13)                 # device_feature_select = 1
        testl $1, 0x04(%r13)                # VIRTIO_F_VERSION_1 (bit 32)
        jnz 3f
        leaq err_version(%rip), %rsi
        jmp vd_fail
3:      movl $0, 0x00(%r13)
        movl 0x04(%r13), %edx               # offered bits 0..31
        movl VD_FEAT_LO(%r15), %ecx
        movl %edx, %eax
        andl %ecx, %eax
        cmpl %ecx, %eax
        je 4f
        leaq err_feature(%rip), %rsi
        jmp vd_fail
4:      andl VD_FEAT_OPT(%r15), %edx        # the optional ones offered
        movq %rdx, VD_FEAT_OPT(%r15)
        orl %edx, %ecx
        movl $0, 0x08(%r13)                 # driver_feature_select = 0
        movl %ecx, 0x0c(%r13)
        movl $1, 0x08(%r13)
        movl $1, 0x0c(%r13)                 # VERSION_1
        movb $0x0b, CC_STATUS(%r13)         # FEATURES_OK
        testb $0x08, CC_STATUS(%r13)
        jnz 5f
        leaq err_features_ok(%rip), %rsi
        jmp vd_fail
5:      ret

/* vd_queues: %r15 = device after vd_negotiate: MSI-X vectors off, VD_NQ */
/* queues set up and enabled; leaves %r13 = common cfg. Clobbers         */
/* everything but %r15.                                                  */
vd_queues:
        movq VD_COMMON(%r15), %r13
        movw $0xffff, 0x10(%r13)            # config_msix_vector = NO_VECTOR
        xorl %r12d, %r12d                   # queue index
        leaq VD_Q(%r15), %rbx
6:      movw %r12w, CC_QSELECT(%r13)
        movzwl CC_QSIZE(%r13), %eax         # maximum; 0 = no such queue
        testl %eax, %eax
        jnz 7f
        leaq err_queue(%rip), %rsi
        jmp vd_fail
7:      movl $QMAX, %ecx
8:      cmpl %eax, %ecx                     # largest power of 2 <= min(max, QMAX)
        jbe 9f
        shrl $1, %ecx
        jmp 8b
9:      movw %cx, CC_QSIZE(%r13)
        movq %rcx, Q_SIZE(%rbx)
        movq %r12, Q_INDEX(%rbx)
        movq $0, Q_AVAIL(%rbx)
        movq $0, Q_USED(%rbx)
        movw $0xffff, 0x1a(%r13)            # queue_msix_vector = NO_VECTOR
        movq Q_RING(%rbx), %rdi
        xorl %eax, %eax
        movl $512, %ecx
        rep stosq                           # clear the ring page
        movq Q_RING(%rbx), %rax
        movl %eax, 0x20(%r13)               # queue_desc, low then high
        movq %rax, %rdx
        shrq $32, %rdx
        movl %edx, 0x24(%r13)
        addq $0x400, %rax
        movl %eax, 0x28(%r13)               # queue_driver (avail ring)
        movl %edx, 0x2c(%r13)
        movw $1, (%rax)                     # avail flags: VIRTQ_AVAIL_F_NO_INTERRUPT
        addq $0x400, %rax
        movl %eax, 0x30(%r13)               # queue_device (used ring)
        movl %edx, 0x34(%r13)
        movzwl 0x1e(%r13), %eax             # queue_notify_off
        imulq VD_NOTIFY_MULT(%r15), %rax
        addq VD_NOTIFY(%r15), %rax
        movq %rax, Q_NOTIFY(%rbx)
        movw $1, 0x1c(%r13)                 # queue_enable
        incl %r12d
        addq $64, %rbx
        cmpq VD_NQ(%r15), %r12
        jb 6b
        ret

/* vq_submit: make descriptor chain %eax available on queue %rbx. */
/* Clobbers rcx, rdx, rsi.                                        */
vq_submit:
        movq Q_RING(%rbx), %rsi
        movq Q_AVAIL(%rbx), %rcx
        movq Q_SIZE(%rbx), %rdx
        decq %rdx
        andq %rcx, %rdx
        movw %ax, 0x404(%rsi,%rdx,2)        # avail ring[idx % size]
        incl %ecx
        movzwl %cx, %ecx
        movq %rcx, Q_AVAIL(%rbx)
        movw %cx, 0x402(%rsi)               # avail idx
        ret

/* vq_kick: notify the device of queue %rbx. Clobbers rax, rdx. */
vq_kick:
        mfence
        movq Q_NOTIFY(%rbx), %rdx
        movq Q_INDEX(%rbx), %rax
        movw %ax, (%rdx)
        ret

/* vq_wait: wait for the next used element of queue %rbx; %eax = its id, */
/* %ecx = its length. Clobbers rdx, rsi.                                 */
vq_wait:
        pushq %r12
        call vd_start_wait
        xorl %r12d, %r12d
1:      movq Q_RING(%rbx), %rsi
        movzwl 0x802(%rsi), %eax            # used idx
        cmpq Q_USED(%rbx), %rax
        jne 5f
        movq VD_POLL(%r15), %rax
        testq %rax, %rax
        jz 2f
        call *%rax
2:      incl %r12d
        testl $0xfff, %r12d
        jnz 3f
        movq VD_COMMON(%r15), %rax
        testb $0x40, CC_STATUS(%rax)        # DEVICE_NEEDS_RESET
        jnz 4f
3:      call vd_wait_tick
        jnc 1b
        leaq err_timeout(%rip), %rsi
        jmp vd_fail
4:      leaq err_needs_reset(%rip), %rsi
        jmp vd_fail
5:      movq Q_USED(%rbx), %rcx
        movq Q_SIZE(%rbx), %rdx
        decq %rdx
        andq %rcx, %rdx
        movl 0x804(%rsi,%rdx,8), %eax       # used ring[idx % size].id
        incl %ecx
        movzwl %cx, %ecx
        movq %rcx, Q_USED(%rbx)
        movl 0x808(%rsi,%rdx,8), %ecx       # .len
        popq %r12
        ret

/* ---- virtio-blk ---------------------------------------------------------- */

blk_init:
        leaq blk_dev(%rip), %r15
        call vd_init
        movq VD_DEVCFG(%r15), %rsi
1:      movzbl CC_GENERATION(%r13), %ecx
        movl (%rsi), %eax                   # capacity, low then high
        movl 4(%rsi), %edx
        movzbl CC_GENERATION(%r13), %edi
        cmpl %ecx, %edi
        jne 1b
        shlq $32, %rdx
        orq %rdx, %rax
        movq %rax, blk_capacity(%rip)
        movb $0x0f, CC_STATUS(%r13)         # DRIVER_OK
        leaq msg_blk(%rip), %rsi
        call puts
        leaq msg_capacity(%rip), %rsi
        call puts
        movq blk_capacity(%rip), %rax
        call print_dec
        movb $'\n', %al
        call putc
        movq blk_k(%rip), %rax
        cmpq blk_capacity(%rip), %rax
        jbe 2f
        leaq err_capacity(%rip), %rsi
        jmp vd_fail
2:      ret

/* blk_req: one request: %eax = type (0 IN, 1 OUT, 4 FLUSH), %rdx = sector, %rdi = a buffer */
/* of blk_len bytes (512 unless blkbench=; FLUSH has no data descriptor).                   */
blk_req:
        leaq blk_dev(%rip), %r15
        leaq blk_dev + VD_Q(%rip), %rbx
        movl %eax, blk_hdr(%rip)
        movl $0, blk_hdr + 4(%rip)
        movq %rdx, blk_hdr + 8(%rip)
        movb $0xff, blk_status(%rip)
        movq Q_RING(%rbx), %rsi
        leaq blk_hdr(%rip), %rcx
        movq %rcx, 0(%rsi)                  # desc 0: header, device-readable
        movl $16, 8(%rsi)
        movw $1, 12(%rsi)                   # NEXT
        movw $1, 14(%rsi)
        cmpl $4, %eax
        jne 4f
        movw $2, 14(%rsi)                   # FLUSH: header, then the status byte
4:      movq %rdi, 16(%rsi)                 # desc 1: data
        movq blk_len(%rip), %rcx
        movl %ecx, 24(%rsi)
        movl $1, %ecx                       # NEXT (OUT: device-readable)
        testl %eax, %eax
        jnz 1f
        movl $3, %ecx                       # NEXT | WRITE (IN)
1:      movw %cx, 28(%rsi)
        movw $2, 30(%rsi)
        leaq blk_status(%rip), %rcx
        movq %rcx, 32(%rsi)                 # desc 2: status byte, device-writable
        movl $1, 40(%rsi)
        movw $2, 44(%rsi)
        movw $0, 46(%rsi)
        xorl %eax, %eax
        call vq_submit
        call vq_kick
        call vq_wait
        testl %eax, %eax
        jz 2f
        leaq err_used(%rip), %rsi
        jmp vd_fail
2:      movzbl blk_status(%rip), %eax
        testl %eax, %eax
        jz 3f
        leaq err_status(%rip), %rsi
        jmp vd_fail_num
3:      ret

/* blk_pass: pass %r10: write its record to sector p mod K, read it back. */
blk_pass:
        movq %r10, %rax
        xorl %edx, %edx
        divq blk_k(%rip)
        movq %rdx, %r12                     # sector
        leaq blk_wbuf(%rip), %rdi
        movabsq $0x4b4c425952524546, %rax   # "FERRYBLK"
        movq %rax, (%rdi)
        movq %r10, 8(%rdi)
        movq %r12, 16(%rdi)
        movq %r10, %rax
        notq %rax
        movq %rax, 24(%rdi)
        movabsq $0x9e3779b97f4a7c15, %r11
        movl $4, %ecx
1:      leaq (%r10,%rcx), %rax              # word k = (p + k) * 0x9e3779b97f4a7c15
        imulq %r11, %rax
        movq %rax, (%rdi,%rcx,8)
        incl %ecx
        cmpl $64, %ecx
        jb 1b
        movl $1, %eax                       # VIRTIO_BLK_T_OUT
        movq %r12, %rdx
        call blk_req
        leaq blk_rbuf(%rip), %rdi
        xorl %eax, %eax
        movl $64, %ecx
        rep stosq
        xorl %eax, %eax                     # VIRTIO_BLK_T_IN
        movq %r12, %rdx
        leaq blk_rbuf(%rip), %rdi
        call blk_req
        leaq blk_wbuf(%rip), %rsi
        leaq blk_rbuf(%rip), %rdi
        movl $64, %ecx
        repe cmpsq
        je 2f
        leaq err_readback(%rip), %rsi
        jmp vd_fail
2:      ret

/* blk_bench: `blkbench=M`: write M MiB from sector 0 in 64 KiB requests, flush, read
   them back (each request's first word checked), printing `blkbench: start`,
   `blkbench: written` (after the flush) and `blkbench: read` as each phase ends,
   so the host times the phases from the serial port. */
blk_bench:
        movq blkbench_mib(%rip), %rax
        shlq $11, %rax                      # sectors
        cmpq blk_capacity(%rip), %rax
        jbe 1f
        leaq err_capacity(%rip), %rsi
        jmp vd_fail
1:      movq %rax, %r13                     # end sector
        leaq blk_bbuf(%rip), %rdi
        movabsq $0x48434e4542594652, %rax   # "FRYBENCH"
        movl $BENCH_BYTES / 8, %ecx
        rep stosq
        movq $BENCH_BYTES, blk_len(%rip)
        leaq msg_bench_start(%rip), %rsi
        call puts
        xorl %r12d, %r12d                   # sector
2:      movl $1, %eax                       # VIRTIO_BLK_T_OUT
        movq %r12, %rdx
        leaq blk_bbuf(%rip), %rdi
        pushq %r13
        call blk_req
        popq %r13
        addq $BENCH_BYTES / 512, %r12
        cmpq %r13, %r12
        jb 2b
        movl $4, %eax                       # VIRTIO_BLK_T_FLUSH
        xorl %edx, %edx
        leaq blk_bbuf(%rip), %rdi
        pushq %r13
        call blk_req
        popq %r13
        leaq msg_bench_written(%rip), %rsi
        call puts
        xorl %r12d, %r12d
3:      movq $0, blk_bbuf(%rip)
        xorl %eax, %eax                     # VIRTIO_BLK_T_IN
        movq %r12, %rdx
        leaq blk_bbuf(%rip), %rdi
        pushq %r13
        call blk_req
        popq %r13
        movabsq $0x48434e4542594652, %rax
        cmpq blk_bbuf(%rip), %rax
        je 4f
        leaq err_readback(%rip), %rsi
        jmp vd_fail
4:      addq $BENCH_BYTES / 512, %r12
        cmpq %r13, %r12
        jb 3b
        leaq msg_bench_read(%rip), %rsi
        call puts
        movq $512, blk_len(%rip)
        ret

/* ---- virtio-net ---------------------------------------------------------- */

net_init:
        leaq net_dev(%rip), %r15
        call vd_init
        movq VD_DEVCFG(%r15), %rsi
        leaq net_mac(%rip), %rdi
1:      movzbl CC_GENERATION(%r13), %ecx
        xorl %edx, %edx
2:      movb (%rsi,%rdx), %al               # mac[0..6], byte accesses
        movb %al, (%rdi,%rdx)
        incl %edx
        cmpl $6, %edx
        jb 2b
        movzbl CC_GENERATION(%r13), %eax
        cmpl %ecx, %eax
        jne 1b
        movb $0x0f, CC_STATUS(%r13)         # DRIVER_OK
        leaq msg_net(%rip), %rsi
        call puts
        leaq msg_mac(%rip), %rsi
        call puts
        xorl %r12d, %r12d
3:      testl %r12d, %r12d
        jz 4f
        movb $':', %al
        call putc
4:      leaq net_mac(%rip), %rsi
        movzbl (%rsi,%r12), %eax
        call print_hex2
        incl %r12d
        cmpl $6, %r12d
        jb 3b
        movb $'\n', %al
        call putc
        leaq net_dev + VD_Q(%rip), %rbx     # receiveq1: post min(NRX, size) buffers
        movq Q_SIZE(%rbx), %r12
        cmpq $NRX, %r12
        jbe 5f
        movl $NRX, %r12d
5:      xorl %r14d, %r14d
6:      movq Q_RING(%rbx), %rsi
        movl %r14d, %eax
        shll $4, %eax
        addq %rax, %rsi                     # desc r14
        movl %r14d, %eax
        imull $RXBUF, %eax
        leaq net_rxbufs(%rip), %rcx
        addq %rcx, %rax
        movq %rax, (%rsi)
        movl $RXBUF, 8(%rsi)
        movw $2, 12(%rsi)                   # WRITE
        movw $0, 14(%rsi)
        movl %r14d, %eax
        call vq_submit
        incl %r14d
        cmpl %r12d, %r14d
        jb 6b
        call vq_kick
        ret

/* print_hex2: %al as two lower-case hex digits. Clobbers rax, rcx, rdx. */
print_hex2:
        movl %eax, %ecx
        shrb $4, %al
        call 1f
        movl %ecx, %eax
        andb $0xf, %al
1:      cmpb $10, %al
        jb 2f
        addb $('a' - '0' - 10), %al
2:      addb $'0', %al
        jmp putc

/* net_rx_poll: consume used receive buffers, queue a FERRYPON for each */
/* FERRYPNG, re-post every buffer. %r15 = net_dev. Clobbers rax, rcx,    */
/* rdx, rsi, rdi.                                                        */
net_rx_poll:
        pushq %rbx
        pushq %r12
        pushq %r13
        leaq net_dev + VD_Q(%rip), %rbx
        xorl %r13d, %r13d                   # buffers re-posted
1:      movq Q_RING(%rbx), %rsi
        movzwl 0x802(%rsi), %eax
        cmpq Q_USED(%rbx), %rax
        je 8f
        movq Q_USED(%rbx), %rcx
        movq Q_SIZE(%rbx), %rdx
        decq %rdx
        andq %rcx, %rdx
        movl 0x804(%rsi,%rdx,8), %r12d      # id
        incl %ecx
        movzwl %cx, %ecx
        movq %rcx, Q_USED(%rbx)
        movl 0x808(%rsi,%rdx,8), %ecx       # len
        cmpl $NRX, %r12d
        jb 2f
        leaq err_used(%rip), %rsi
        jmp vd_fail
2:      cmpl $(12 + 14 + 16), %ecx
        jb 5f
        movl %r12d, %edi
        imull $RXBUF, %edi
        leaq net_rxbufs(%rip), %rax
        addq %rax, %rdi
        cmpw $0xb588, 24(%rdi)              # ethertype 0x88b5 (network order)
        jne 5f
        movabsq $0x474e505952524546, %rax   # "FERRYPNG"
        cmpq %rax, 26(%rdi)
        jne 5f
        movq pong_tail(%rip), %rax
        movq %rax, %rdx
        subq pong_head(%rip), %rdx
        cmpq $PONGQ, %rdx
        jae 5f                              # queue full: drop
        andl $(PONGQ - 1), %eax
        shll $4, %eax
        leaq pong_q(%rip), %rdx
        addq %rax, %rdx
        movl 18(%rdi), %eax                 # source MAC
        movl %eax, (%rdx)
        movzwl 22(%rdi), %eax
        movw %ax, 4(%rdx)
        movq 34(%rdi), %rax                 # n
        movq %rax, 8(%rdx)
        incq pong_tail(%rip)
5:      movl %r12d, %eax                    # re-post (descriptor unchanged)
        call vq_submit
        incl %r13d
        jmp 1b
8:      testl %r13d, %r13d
        jz 9f
        call vq_kick
9:      popq %r13
        popq %r12
        popq %rbx
        ret

/* net_frame: build the frame to the MAC at %rsi with payload magic %rax, */
/* value %rdx in net_txbuf. Clobbers rax, rcx, rdx, rdi.                  */
net_frame:
        pushq %rax
        pushq %rdx
        leaq net_txbuf(%rip), %rdi
        xorl %eax, %eax
        movl $(TXLEN + 7) / 8, %ecx
        rep stosq
        leaq net_txbuf(%rip), %rdi
        movl (%rsi), %eax                   # destination
        movl %eax, 12(%rdi)
        movzwl 4(%rsi), %eax
        movw %ax, 16(%rdi)
        movl net_mac(%rip), %eax            # source
        movl %eax, 18(%rdi)
        movzwl net_mac + 4(%rip), %eax
        movw %ax, 22(%rdi)
        movw $0xb588, 24(%rdi)              # ethertype 0x88b5
        popq %rdx
        popq %rax
        movq %rax, 26(%rdi)
        movq %rdx, 34(%rdi)
        ret

/* net_tx: send net_txbuf on transmitq1 and wait until the device used it. */
net_tx:
        leaq net_dev + VD_Q + 64(%rip), %rbx
        movq Q_RING(%rbx), %rsi
        leaq net_txbuf(%rip), %rax
        movq %rax, (%rsi)
        movl $TXLEN, 8(%rsi)
        movl $0, 12(%rsi)                   # device-readable, no next
        xorl %eax, %eax
        call vq_submit
        call vq_kick
        call vq_wait
        testl %eax, %eax
        jz 1f
        leaq err_used(%rip), %rsi
        jmp vd_fail
1:      ret

/* net_pass: pass %r10: broadcast FERRYNET p, poll receive, answer pings. */
net_pass:
        leaq net_dev(%rip), %r15
        leaq bcast_mac(%rip), %rsi
        movabsq $0x54454e5952524546, %rax   # "FERRYNET"
        movq %r10, %rdx
        call net_frame
        call net_tx
        call net_rx_poll
        movl $PONGQ, %r14d                  # at most this many replies per pass
1:      movq pong_head(%rip), %rax
        cmpq pong_tail(%rip), %rax
        je 9f
        andl $(PONGQ - 1), %eax
        shll $4, %eax
        leaq pong_q(%rip), %rsi
        addq %rax, %rsi
        movq 8(%rsi), %rdx
        movabsq $0x4e4f505952524546, %rax   # "FERRYPON"
        call net_frame
        incq pong_head(%rip)
        call net_tx
        decl %r14d
        jnz 1b
9:      ret

/* ---- virtio-rng ---------------------------------------------------------- */

        .set RNGLEN, 64                     # bytes asked for every pass

rng_init:
        leaq rng_dev(%rip), %r15
        call vd_init
        movb $0x0f, CC_STATUS(%r13)         # DRIVER_OK
        leaq msg_rng(%rip), %rsi
        call puts
        leaq msg_ok(%rip), %rsi
        jmp puts

/* rng_pass: ask for RNGLEN bytes; a used length of 8 or more must not be */
/* all zero nor the previous pass's bytes.                                */
rng_pass:
        leaq rng_dev(%rip), %r15
        leaq rng_dev + VD_Q(%rip), %rbx
        leaq rng_buf(%rip), %rdi
        xorl %eax, %eax
        movl $RNGLEN / 8, %ecx
        rep stosq
        movq Q_RING(%rbx), %rsi
        leaq rng_buf(%rip), %rax
        movq %rax, (%rsi)                   # desc 0: the buffer, device-writable
        movl $RNGLEN, 8(%rsi)
        movl $2, 12(%rsi)                   # flags WRITE, next 0
        xorl %eax, %eax
        call vq_submit
        call vq_kick
        call vq_wait
        testl %eax, %eax
        jz 1f
        leaq err_used(%rip), %rsi
        jmp vd_fail
1:      movl %ecx, %eax
        testl %ecx, %ecx
        jz 2f
        cmpl $RNGLEN, %ecx
        jbe 3f
2:      leaq err_length(%rip), %rsi
        jmp vd_fail_num
3:      cmpl $8, %ecx                       # too short to judge
        jb 6f
        leaq rng_buf(%rip), %rsi
        xorl %eax, %eax
        movl $RNGLEN / 8, %ecx
4:      orq (%rsi), %rax
        addq $8, %rsi
        decl %ecx
        jnz 4b
        testq %rax, %rax
        jnz 5f
        leaq err_zero(%rip), %rsi
        jmp vd_fail
5:      leaq rng_buf(%rip), %rsi
        leaq rng_prev(%rip), %rdi
        movl $RNGLEN / 8, %ecx
        repe cmpsq
        jne 6f
        leaq err_repeated(%rip), %rsi
        jmp vd_fail
6:      leaq rng_buf(%rip), %rsi
        leaq rng_prev(%rip), %rdi
        movl $RNGLEN / 8, %ecx
        rep movsq
        ret

/* ---- virtio-balloon ------------------------------------------------------ */
/* The balloon's pool is the usable pages past the working set; balloon page */
/* k (0 = first inflated) is usable page total_pages - 1 - k, so the balloon */
/* grows down from the top of usable RAM.                                    */

        .set BAL_BATCH, 256                 # PFNs per inflate or deflate buffer
        .set BAL_F_STATS_VQ, 1              # feature bit
        .set BAL_STATS_LEN, 3 * 10          # three (le16 tag, le64 value) entries

balloon_init:
        leaq balloon_dev(%rip), %r15
        cmpq $0, fill(%rip)
        je 1f
        leaq err_fill(%rip), %rsi           # the fill owns every page past the working set
        jmp vd_fail
1:      call vd_negotiate
        movq VD_FEAT_OPT(%r15), %rax
        btl $BAL_F_STATS_VQ, %eax
        jc 2f
        movq $2, VD_NQ(%r15)                # no statsq
2:      call vd_queues
        movq total_pages(%rip), %rax
        subq ws_pages(%rip), %rax
        movq %rax, bal_pool(%rip)
        movb $0x0f, CC_STATUS(%r13)         # DRIVER_OK
        leaq msg_balloon(%rip), %rsi
        call puts
        leaq msg_pool(%rip), %rsi
        call puts
        movq bal_pool(%rip), %rax
        call print_dec
        leaq msg_stats(%rip), %rsi
        call puts
        movq VD_NQ(%r15), %rax
        subq $2, %rax
        call print_dec
        movb $'\n', %al
        call putc
        cmpq $3, VD_NQ(%r15)
        jne 3f
        call bal_stats_post
3:      ret

/* bal_stats_post: fill the stats buffer and make it available on statsq. */
/* %r15 = balloon_dev. Clobbers rax, rbx, rcx, rdx, rsi, rdi.              */
bal_stats_post:
        leaq balloon_dev + VD_Q + 128(%rip), %rbx
        leaq bal_stats(%rip), %rdi
        movq total_pages(%rip), %rax
        shlq $12, %rax
        movw $5, 0(%rdi)                    # VIRTIO_BALLOON_S_MEMTOT: usable RAM
        movq %rax, 2(%rdi)
        movq bal_pool(%rip), %rax
        subq bal_actual(%rip), %rax
        shlq $12, %rax
        movw $4, 10(%rdi)                   # S_MEMFREE: the pool not in the balloon
        movq %rax, 12(%rdi)
        movw $6, 20(%rdi)                   # S_AVAIL: the same
        movq %rax, 22(%rdi)
        movq Q_RING(%rbx), %rsi
        movq %rdi, (%rsi)                   # desc 0: device-readable
        movl $BAL_STATS_LEN, 8(%rsi)
        movl $0, 12(%rsi)
        xorl %eax, %eax
        call vq_submit
        jmp vq_kick

/* bal_page: %rax = GPA of balloon page %r13. Clobbers rsi. */
bal_page:
        movq total_pages(%rip), %rax
        decq %rax
        subq %r13, %rax
        leaq rtab(%rip), %rsi
1:      cmpq (%rsi), %rax
        jb 2f
        addq $16, %rsi
        jmp 1b
2:      shlq $12, %rax
        addq 8(%rsi), %rax
        ret

/* balloon_pass: answer a stats request, then inflate or deflate until     */
/* actual = min(num_pages, pool), BAL_BATCH pages per buffer, writing      */
/* actual after each buffer.                                               */
balloon_pass:
        leaq balloon_dev(%rip), %r15
        cmpq $3, VD_NQ(%r15)
        jne 1f
        leaq balloon_dev + VD_Q + 128(%rip), %rbx
        movq Q_RING(%rbx), %rsi
        movzwl 0x802(%rsi), %eax            # the device gave the stats buffer back?
        cmpq Q_USED(%rbx), %rax
        je 1f
        movq Q_USED(%rbx), %rcx
        incl %ecx
        movzwl %cx, %ecx
        movq %rcx, Q_USED(%rbx)
        call bal_stats_post
1:      movq VD_DEVCFG(%r15), %rsi
        movl (%rsi), %r12d                  # num_pages
        cmpq bal_pool(%rip), %r12
        jbe 2f
        movq bal_pool(%rip), %r12           # the pool is all there is
2:      movq bal_actual(%rip), %r13
        xorl %r14d, %r14d                   # PFNs in the buffer
        leaq bal_pfns(%rip), %rdi
        movabsq $0x4c41425952524546, %r8    # "FERRYBAL"
        cmpq %r12, %r13
        je 9f
        ja 5f
3:      call bal_page                       # inflate balloon page actual
        movq %r8, (%rax)                    # stale data the host must drop
        shrq $12, %rax
        movl %eax, (%rdi,%r14,4)
        incl %r14d
        incq %r13
        cmpq %r12, %r13
        jae 4f
        cmpl $BAL_BATCH, %r14d
        jb 3b
4:      leaq balloon_dev + VD_Q(%rip), %rbx # inflateq
        jmp 7f
5:      decq %r13                           # deflate balloon page actual - 1
        call bal_page
        shrq $12, %rax
        movl %eax, (%rdi,%r14,4)
        incl %r14d
        cmpq %r12, %r13
        jbe 6f
        cmpl $BAL_BATCH, %r14d
        jb 5b
6:      leaq balloon_dev + VD_Q + 64(%rip), %rbx # deflateq
7:      movq Q_RING(%rbx), %rsi
        movq %rdi, (%rsi)                   # desc 0: the PFNs, device-readable
        leal (,%r14,4), %eax
        movl %eax, 8(%rsi)
        movl $0, 12(%rsi)
        xorl %eax, %eax
        call vq_submit
        call vq_kick
        call vq_wait
        testl %eax, %eax
        jz 8f
        leaq err_used(%rip), %rsi
        jmp vd_fail
8:      movq %r13, bal_actual(%rip)
        movq VD_DEVCFG(%r15), %rsi
        movl %r13d, 4(%rsi)                 # actual
        jmp 2b
9:      ret

/* ---- IDE CD-ROM (cdrom=LBA) -------------------------------------------- */
/* Polled PIO with interrupts off (nIEN). cdrom_init resets both legacy      */
/* channels (SRST) and takes the first unit with the ATAPI signature 0xEB14  */
/* in its cylinder registers, reads sector cd_lba into cd_first and prints   */
/* it; every pass reads it again into cd_buf and compares.                   */

        .set IDE_BSY, 0x80
        .set IDE_DRQ, 0x08
        .set IDE_ERR, 0x01
        .set CD_SHOW, 16                    # bytes of the sector printed at boot

cdrom_init:
        leaq cd_dev(%rip), %r15
        xorl %ebx, %ebx                     # channel
1:      leaq ide_ports(%rip), %rsi
        movzwl (%rsi,%rbx,4), %r8d          # command block
        movzwl 2(%rsi,%rbx,4), %edx         # device control
        movb $0x06, %al                     # SRST, nIEN
        outb %al, %dx
        movb $0x02, %al                     # nIEN
        outb %al, %dx
        xorl %ecx, %ecx                     # unit
2:      movl %ecx, %eax
        shll $4, %eax
        orl $0xa0, %eax
        leal 6(%r8), %edx
        outb %al, %dx
        leal 4(%r8), %edx
        inb %dx, %al
        cmpb $0x14, %al
        jne 3f
        leal 5(%r8), %edx
        inb %dx, %al
        cmpb $0xeb, %al
        jne 3f
        movq %r8, cd_base(%rip)
        movq %rcx, cd_unit(%rip)
        jmp 4f
3:      incl %ecx
        cmpl $2, %ecx
        jb 2b
        incl %ebx
        cmpl $2, %ebx
        jb 1b
        leaq err_nodev(%rip), %rsi
        jmp vd_fail
4:      leaq cd_first(%rip), %rdi
        call cd_read
        leaq msg_cdrom(%rip), %rsi
        call puts
        leaq msg_lba(%rip), %rsi
        call puts
        movq cd_lba(%rip), %rax
        call print_dec
        leaq msg_data(%rip), %rsi
        call puts
        leaq cd_first(%rip), %rbx
        xorl %r12d, %r12d
5:      movzbl (%rbx,%r12), %eax
        call print_hex2
        incl %r12d
        cmpl $CD_SHOW, %r12d
        jb 5b
        movb $'\n', %al
        jmp putc

/* cdrom_pass: read the sector again; it must not have changed. */
cdrom_pass:
        leaq cd_buf(%rip), %rdi
        call cd_read
        leaq cd_first(%rip), %rsi
        leaq cd_buf(%rip), %rdi
        movl $2048, %ecx
        repe cmpsb
        je 1f
        leaq err_readback(%rip), %rsi
        jmp vd_fail
1:      ret

/* cd_read: READ(10) of the 2048-byte sector cd_lba into %rdi, byte-count   */
/* limit 2048, by PIO. Clobbers rax, rcx, rdx, rsi, rdi, r8, r12, r14, r15. */
cd_read:
        leaq cd_dev(%rip), %r15
        movq cd_base(%rip), %r8
        movq %rdi, %r14
        call vd_start_wait
        call cd_wait_idle
        movq cd_unit(%rip), %rax
        shll $4, %eax
        orl $0xa0, %eax
        leal 6(%r8), %edx
        outb %al, %dx
        call cd_wait_idle
        xorl %eax, %eax
        leal 1(%r8), %edx
        outb %al, %dx                       # features: PIO
        leal 4(%r8), %edx
        outb %al, %dx                       # byte-count limit 0x800
        movb $0x08, %al
        leal 5(%r8), %edx
        outb %al, %dx
        movb $0xa0, %al                     # PACKET
        leal 7(%r8), %edx
        outb %al, %dx
1:      call cd_wait_idle
        testb $IDE_DRQ, %al
        jnz 2f
        call vd_wait_tick
        jnc 1b
        leaq err_timeout(%rip), %rsi
        jmp vd_fail
2:      movl cd_lba(%rip), %eax
        bswapl %eax
        movl %eax, cd_packet + 2(%rip)
        leaq cd_packet(%rip), %rsi
        movl %r8d, %edx
        movl $6, %ecx
        rep outsw
        xorl %r12d, %r12d                   # bytes received
3:      call cd_wait_idle
        testb $IDE_DRQ, %al
        jz 4f
        leal 4(%r8), %edx
        inb %dx, %al
        movzbl %al, %ecx
        leal 5(%r8), %edx
        inb %dx, %al
        movzbl %al, %eax
        shll $8, %eax
        orl %eax, %ecx                      # bytes in this chunk
        leal (%r12,%rcx), %eax
        cmpl $2048, %eax
        ja 5f
        leaq (%r14,%r12), %rdi
        addl %ecx, %r12d
        shrl $1, %ecx
        movl %r8d, %edx
        rep insw
        jmp 3b
4:      cmpl $2048, %r12d
        jne 5f
        ret
5:      movl %r12d, %eax
        leaq err_length(%rip), %rsi
        jmp vd_fail_num

/* cd_wait_idle: wait until BSY clears; %al = status. ERR fails the guest   */
/* with the status. Clobbers rax, rdx.                                      */
cd_wait_idle:
1:      leal 7(%r8), %edx
        inb %dx, %al
        testb $IDE_BSY, %al
        jz 2f
        call vd_wait_tick
        jnc 1b
        leaq err_timeout(%rip), %rsi
        jmp vd_fail
2:      testb $IDE_ERR, %al
        jz 3f
        movzbl %al, %eax
        leaq err_status(%rip), %rsi
        jmp vd_fail_num
3:      ret

/* io_pass: the per-pass virtio work for pass %r10. Preserves all registers */
/* but rax and rdx.                                                         */
io_pass:
        pushq %rbx
        pushq %rcx
        pushq %rsi
        pushq %rdi
        pushq %r8
        pushq %r9
        pushq %r10
        pushq %r11
        pushq %r12
        pushq %r13
        pushq %r14
        pushq %r15
        cmpq $0, blk_k(%rip)
        je 1f
        call blk_pass
1:      cmpq $0, net_on(%rip)
        je 2f
        call net_pass
2:      cmpq $0, rng_on(%rip)
        je 3f
        call rng_pass
3:      cmpq $0, balloon_on(%rip)
        je 4f
        call balloon_pass
4:      cmpq $0, cd_on(%rip)
        je 5f
        call cdrom_pass
5:      popq %r15
        popq %r14
        popq %r13
        popq %r12
        popq %r11
        popq %r10
        popq %r9
        popq %r8
        popq %rdi
        popq %rsi
        popq %rcx
        popq %rbx
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
key_blkbench:           .asciz "blkbench="
key_blk:                .asciz "blk="
key_net:                .asciz "net="
key_rng:                .asciz "rng="
key_balloon:            .asciz "balloon="
key_cdrom:              .asciz "cdrom="
key_acpi:               .asciz "acpi="
msg_acpi_nopm:          .asciz "dirtier: acpi: no PIIX4 PM\n"
msg_acpi_off:           .asciz "dirtier: acpi: PM I/O disabled\n"
msg_acpi_pm:            .asciz "dirtier: acpi: pm at 0x"
msg_acpi_sci:           .asciz "dirtier: acpi: SCI_EN never set\n"
msg_acpi_button:        .asciz "dirtier: power button\n"
msg_cdrom:              .asciz "cdrom: "
msg_lba:                .asciz "lba="
msg_data:               .asciz " data="
msg_blk:                .asciz "blk: "
msg_net:                .asciz "net: "
msg_rng:                .asciz "rng: "
msg_balloon:            .asciz "balloon: "
msg_ok:                 .asciz "ok\n"
msg_pool:               .asciz "pool="
msg_stats:              .asciz " stats="
msg_err:                .asciz "ERR "
msg_capacity:           .asciz "capacity="
msg_bench_start:        .asciz "blkbench: start\n"
msg_bench_written:      .asciz "blkbench: written\n"
msg_bench_read:         .asciz "blkbench: read\n"
msg_mac:                .asciz "mac="
err_nodev:              .asciz "no device"
err_bar:                .asciz "bar"
err_caps:               .asciz "capabilities"
err_reset:              .asciz "reset timeout"
err_version:            .asciz "no VERSION_1"
err_feature:            .asciz "feature not offered"
err_features_ok:        .asciz "FEATURES_OK not kept"
err_queue:              .asciz "queue unavailable"
err_timeout:            .asciz "timeout"
err_needs_reset:        .asciz "DEVICE_NEEDS_RESET"
err_used:               .asciz "used ring"
err_status:             .asciz "status "
err_capacity:           .asciz "capacity"
err_readback:           .asciz "readback"
err_length:             .asciz "length "
err_zero:               .asciz "zero bytes"
err_repeated:           .asciz "repeated bytes"
err_fill:               .asciz "fill=1"
bcast_mac:              .byte 0xff, 0xff, 0xff, 0xff, 0xff, 0xff

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
        /* I/O bitmap, all 64K ports: the ports ring 3 may use even without IOPL:
           APM control (0xb2, SMI_CMD for acpi=1), the legacy IDE
           channels (0x170-0x177, 0x1f0-0x1f7, 0x376, 0x3f6), COM1 (0x3f8-0x3ff),
           the ACPI PM1a control word (0x604-0x605, poweroff), the reset control
           register (0xcf9) and PCI configuration mechanism #1 (0xcf8-0xcff, virtio).
           acpi_init (ring 3) opens the PIIX4 PM block it finds (acpi=1). */
tss_iobitmap:
        .fill 0xb0 / 8, 1, 0xff             # 0x000-0x0af
        .byte 0xfb                          # 0x0b0-0x0b7: 0xb2 open
        .fill (0x170 - 0xb8) / 8, 1, 0xff   # 0x0b8-0x16f
        .byte 0                             # 0x170-0x177: IDE secondary
        .fill (0x1f0 - 0x178) / 8, 1, 0xff  # 0x178-0x1ef
        .byte 0                             # 0x1f0-0x1f7: IDE primary
        .fill (0x370 - 0x1f8) / 8, 1, 0xff  # 0x1f8-0x36f
        .byte 0xbf                          # 0x370-0x377: 0x376 open
        .fill (0x3f0 - 0x378) / 8, 1, 0xff  # 0x378-0x3ef
        .byte 0xbf                          # 0x3f0-0x3f7: 0x3f6 open
        .byte 0                             # 0x3f8-0x3ff
        .fill (0x600 - 0x400) / 8, 1, 0xff  # 0x400-0x5ff
        .byte 0xcf                          # 0x600-0x607: 0x604, 0x605 open
        .fill (0xcf8 - 0x608) / 8, 1, 0xff  # 0x608-0xcf7
        .byte 0                             # 0xcf8-0xcff: PCI config, reset
        .fill (0x10000 - 0xd00) / 8, 1, 0xff  # 0xd00-0xffff
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
poll_ticks:     .quad 0
acpi_on:        .quad 0
pm_base:        .quad 0                     # ACPI PM I/O base once found (acpi=1)
pause_ticks:    .quad 0
last_hb:        .quad 0
total_pages:    .quad 0
nranges:        .quad 0
ranges:         .fill 2 * MAX_RANGES, 8, 0
rtab:           .fill 2 * MAX_RANGES, 8, 0
blk_k:          .quad 0
blkbench_mib:   .quad 0
blk_len:        .quad 512
net_on:         .quad 0
rng_on:         .quad 0
balloon_on:     .quad 0
cd_on:          .quad 0
cd_lba:         .quad 0
cd_base:        .quad 0
cd_unit:        .quad 0
cd_dev:         .quad msg_cdrom             # a vdev prefix, for vd_fail
ide_ports:      .word 0x1f0, 0x3f6, 0x170, 0x376
cd_packet:      .byte 0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0
        .balign 8
bal_pool:       .quad 0
bal_actual:     .quad 0
io_ticks:       .quad 0
wait_until:     .quad 0
fail_num:       .quad 0
fail_has_num:   .quad 0
blk_capacity:   .quad 0
net_mac:        .quad 0
pong_head:      .quad 0
pong_tail:      .quad 0
        /* struct vdev: prefix, cfg, common, notify, isr, devcfg, notify mult, */
        /* id, queues, low features, poll fn, optional low features; then one  */
        /* struct vq per queue.                                                */
blk_dev:
        .quad msg_blk, 0, 0, 0, 0, 0, 0, 0x10421af4, 1, 0, 0, 0
        .quad 0, blk_ring, 0, 0, 0, 0, 0, 0
        .quad 0, 0, 0, 0, 0, 0, 0, 0
net_dev:
        .quad msg_net, 0, 0, 0, 0, 0, 0, 0x10411af4, 2, 1 << 5, net_rx_poll, 0
        .quad 0, net_ring0, 0, 0, 0, 0, 0, 0
        .quad 0, net_ring1, 0, 0, 0, 0, 0, 0
rng_dev:
        .quad msg_rng, 0, 0, 0, 0, 0, 0, 0x10441af4, 1, 0, 0, 0
        .quad 0, rng_ring, 0, 0, 0, 0, 0, 0
balloon_dev:
        .quad msg_balloon, 0, 0, 0, 0, 0, 0, 0x10451af4, 3, 0, 0, 1 << BAL_F_STATS_VQ
        .quad 0, bal_ring0, 0, 0, 0, 0, 0, 0
        .quad 0, bal_ring1, 0, 0, 0, 0, 0, 0
        .quad 0, bal_ring2, 0, 0, 0, 0, 0, 0

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
        /* virtio: rings and I/O buffers (device DMA stays below 2 MiB) */
        .balign 4096
blk_ring:       .skip 4096
net_ring0:      .skip 4096
net_ring1:      .skip 4096
net_rxbufs:     .skip NRX * RXBUF
net_txbuf:      .skip 128
blk_wbuf:       .skip 512
blk_rbuf:       .skip 512
blk_hdr:        .skip 16
blk_status:     .skip 16
        .balign 4096
blk_bbuf:       .skip BENCH_BYTES
pong_q:         .skip PONGQ * 16
        .balign 4096
rng_ring:       .skip 4096
bal_ring0:      .skip 4096
bal_ring1:      .skip 4096
bal_ring2:      .skip 4096
bal_pfns:       .skip BAL_BATCH * 4
rng_buf:        .skip RNGLEN
rng_prev:       .skip RNGLEN
bal_stats:      .skip 32
cd_first:       .skip 2048
cd_buf:         .skip 2048
