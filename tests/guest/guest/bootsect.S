/*
 * bootsect: a BIOS boot loader for the dirtier (GNU as, 16-bit real mode,
 * then 32-bit protected mode). The disk layout and the parameter block are
 * documented in ../src/bootdisk.rs, which fills the block in; keep both in
 * step. Plain `as`, no C preprocessor: comments are C-style or `#`.
 *
 * The BIOS loads sector 0 at 0x7c00 and jumps to it with DL = boot drive.
 * Sector 0 reads every following sector of the image (the rest of this
 * loader, the command line, the payload) to 0x7e00 up with INT 13h AH=42h,
 * at most 127 sectors a call. The rest of the loader then collects the E820
 * map (INT 15h EAX=E820h) as PVH memory map entries, enables A20 (port
 * 0x92), enters 32-bit protected mode with a flat GDT, copies the payload to
 * its load address, zeroes its .bss, fills in an hvm_start_info and jumps to
 * the PVH entry with %ebx = its address, as a PVH loader would.
 *
 * Real mode and ring 0 are slow under nested KVM: few instructions, and the
 * copying is `rep movsl` / `rep stosl` in 32-bit code.
 *
 * Low memory used (all below the 0x90000 limit bootdisk.rs checks):
 *   0x6000  hvm_start_info (56 bytes)
 *   0x6040  memory map, 24 bytes an entry, at most MAX_E820 entries
 *   0x7c00  this loader (stack below it), then the command line
 *           (CMDLINE_BYTES, NUL-terminated), then the payload as read.
 */

        .set INFO, 0x6000
        .set MEMMAP, 0x6040
        .set MAX_E820, 64                   # 0x6040 + 64 * 24 < 0x6a00
        .set CMDLINE_BYTES, 4096
        .set HVM_START_MAGIC, 0x336ec578
        .set SMAP, 0x534d4150
        .set COM1, 0x3f8
        .set MAX_SECTORS_PER_READ, 127      # SeaBIOS's limit (64 KiB - 512)
        .set SEL_CODE, 0x08
        .set SEL_DATA, 0x10

        .section .text, "ax"
        .code16
        .globl _start
_start:
        cli
        xorw %ax, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw $0x7c00, %sp
        ljmp $0, $1f                        # CS:IP = 0:0x7cxx
1:      sti
        cld
        movb %dl, boot_drive

read_more:
        movl sectors_left, %eax
        testl %eax, %eax
        jz read_done
        cmpl $MAX_SECTORS_PER_READ, %eax
        jbe 2f
        movl $MAX_SECTORS_PER_READ, %eax
2:      subl %eax, sectors_left
        movw %ax, dap_count
        movw $dap, %si
        movb boot_drive, %dl
        movb $0x42, %ah
        int $0x13
        jc read_error
        movzwl dap_count, %eax
        addl %eax, dap_lba
        shlw $5, %ax                        # sectors -> paragraphs
        addw %ax, dap_seg
        jmp read_more
read_done:
        jmp stage2

read_error:
        movw $msg_read, %si
        /* fall through */

/* fail: print the NUL-terminated message at %si on COM1, halt for good. */
fail:
        movw $COM1, %dx
1:      lodsb
        testb %al, %al
        jz 2f
        outb %al, %dx
        jmp 1b
2:      cli
        hlt
        jmp 2b

msg_read:       .asciz "bootdisk: ERR read\n"

        .balign 4
dap:    .byte 16, 0                         # size, reserved
dap_count:
        .word 0
        .word 0                             # buffer offset
dap_seg:
        .word 0x07e0                        # buffer segment: 0x7e00 (LBA 1)
dap_lba:
        .quad 1
boot_drive:
        .byte 0

/* Parameter block, filled in by bootdisk.rs (offsets fixed there). */
        .org 0x198
        .ascii "FBL1"                       # 0x198: magic
sectors_left:
        .long 0                             # 0x19c: sectors after sector 0
load_paddr:
        .long 0                             # 0x1a0: payload load address
payload_filesz:
        .long 0                             # 0x1a4: bytes to copy
payload_memsz:
        .long 0                             # 0x1a8: bytes in memory (.bss zeroed)
payload_entry:
        .long 0                             # 0x1ac: PVH entry point
        .long cmdline                       # 0x1b0: where the command line lands
        .long payload                       # 0x1b4: where the payload lands

        .org 0x1fe
        .word 0xaa55

/* ------------------------------------------------------------------------ */
/* Sector 1 on: read by sector 0.                                            */

stage2:
        /* E820, straight into PVH memmap entries: {addr, size, type, 0}. */
        movw $MEMMAP, %di
        xorl %ebx, %ebx
        xorw %bp, %bp                       # entries kept
e820_next:
        movl $1, 20(%di)                    # ACPI 3.0 attributes: "valid" if 20 bytes come
        movl $0xe820, %eax
        movl $24, %ecx
        movl $SMAP, %edx
        int $0x15
        jc e820_end                         # past the last entry
        cmpl $SMAP, %eax
        jne e820_error
        cmpb $20, %cl
        jbe 1f
        testb $1, 20(%di)                   # 24 bytes: "ignore this entry" when clear
        jz 2f
1:      movl 8(%di), %eax
        orl 12(%di), %eax
        jz 2f                               # empty range
        movl $0, 20(%di)
        addw $24, %di
        incw %bp
        cmpw $MAX_E820, %bp
        jae e820_end
2:      testl %ebx, %ebx
        jnz e820_next
e820_end:
        testw %bp, %bp
        jz e820_error
        movw %bp, e820_entries

        /* Fast A20, then check that 1 MiB does not wrap to 0. */
        inb $0x92, %al
        testb $2, %al
        jnz 3f
        orb $2, %al
        andb $0xfe, %al                     # never the reset bit
        outb %al, $0x92
3:      movw $0xffff, %ax
        movw %ax, %fs
        movw 0x7dfe, %ax                    # the boot signature
        notw %fs:0x7e0e                     # 0x107dfe, or 0x7dfe if A20 is off
        cmpw 0x7dfe, %ax                    # (not leaves the flags alone)
        notw %fs:0x7e0e
        jne a20_error

        cli
        lgdtl gdt_ptr
        movl %cr0, %eax
        orb $1, %al                         # PE
        movl %eax, %cr0
        ljmpl $SEL_CODE, $pm32

e820_error:
        movw $msg_e820, %si
        jmp fail
a20_error:
        movw $msg_a20, %si
        jmp fail

        .code32
pm32:
        movl $SEL_DATA, %eax
        movl %eax, %ds
        movl %eax, %es
        movl %eax, %ss
        movl %eax, %fs
        movl %eax, %gs
        movl $0x7c00, %esp

        /* Payload to its load address (whole dwords: the tail is zeroed next). */
        movl $payload, %esi
        movl load_paddr, %edi
        movl payload_filesz, %ecx
        addl $3, %ecx
        shrl $2, %ecx
        rep movsl
        /* .bss: memsz - filesz bytes from load + filesz. */
        movl load_paddr, %edi
        addl payload_filesz, %edi
        movl payload_memsz, %ecx
        subl payload_filesz, %ecx
        movl %ecx, %edx
        xorl %eax, %eax
        shrl $2, %ecx
        rep stosl
        movl %edx, %ecx
        andl $3, %ecx
        rep stosb

        /* struct hvm_start_info, version 1. */
        movl $INFO, %edi
        movl $14, %ecx                      # 56 bytes
        rep stosl
        movl $HVM_START_MAGIC, INFO
        movl $1, INFO + 4                   # version
        movl $cmdline, INFO + 24            # cmdline_paddr
        movl $MEMMAP, INFO + 40             # memmap_paddr
        movzwl e820_entries, %eax
        movl %eax, INFO + 48                # memmap_entries

        movl $INFO, %ebx
        jmp *payload_entry

msg_e820:       .asciz "bootdisk: ERR e820\n"
msg_a20:        .asciz "bootdisk: ERR a20\n"

        .balign 8
gdt:    .quad 0
        .quad 0x00cf9a000000ffff            # 0x08: code, flat 4 GiB, 32-bit
        .quad 0x00cf92000000ffff            # 0x10: data, flat 4 GiB
gdt_end:
gdt_ptr:
        .word gdt_end - gdt - 1
        .long gdt
e820_entries:
        .word 0

        .balign 512, 0
        .globl cmdline
cmdline = .                                 # CMDLINE_BYTES, then the payload
payload = cmdline + CMDLINE_BYTES
