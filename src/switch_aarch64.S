/*
 * The fiber context switch for AArch64, AAPCS64 (see src/fiber.h).
 *
 * A suspended context is just a stack pointer: the switch stores what
 * AAPCS64 says a callee must preserve (x19-x28, the frame pointer x29, the
 * low 64 bits of v8-v15, i.e. d8-d15, and sp itself) plus the link register
 * x30 (where to resume) and FPCR (so that each context keeps its own
 * rounding mode, as the x86_64 switch and the ucontext fallback do) on the
 * current stack, stores sp, loads the other context's sp and restores the
 * same things from there. x18 (the platform register) is not touched.
 *
 * Saved frame, from the saved sp upwards (176 bytes, so sp stays a multiple
 * of 16 as AAPCS64 requires at all times):
 *     0  x19 x20    16  x21 x22    32  x23 x24    48  x25 x26    64  x27 x28
 *    80  x29 x30    96  d8 d9     112  d10 d11   128  d12 d13   144  d14 d15
 *   160  FPCR, 8 unused
 *
 * A new fiber gets the same frame, built by caller__fiber_asm_init, with
 * x30 = the trampoline, x19 = arg, x20 = main, x21 = exit. The trampoline
 * calls main(arg) and then exit(arg), which switches away for good.
 *
 * Written from the AAPCS64. Tested only under qemu-aarch64 user emulation
 * (tests/test-fiber.c built with aarch64-linux-gnu-gcc 12), not on hardware;
 * BTI and pointer authentication are not used.
 *
 * The whole file assembles to nothing on other architectures and in the
 * ucontext build (CMake builds every .S file of src/ everywhere), except the
 * .note.GNU-stack at the end.
 */
#if defined(__aarch64__) && defined(__LP64__) &&                                                  \
    !(defined(CALLER_FIBER_UCONTEXT) && CALLER_FIBER_UCONTEXT)

    .text

/*
 * void *caller__fiber_asm_init(void *top, void *arg,
 *                              void (*main)(void *), void (*exit)(void *));
 *
 * x0 = top, x1 = arg, x2 = main, x3 = exit. Builds a new fiber's first frame
 * just below top (rounded down to 16 bytes) and returns the stack pointer to
 * switch to. The fiber starts with the caller's FPCR.
 */
    .globl  caller__fiber_asm_init
    .hidden caller__fiber_asm_init
    .type   caller__fiber_asm_init, %function
    .p2align 4
caller__fiber_asm_init:
    .cfi_startproc
    and     x0, x0, #0xfffffffffffffff0
    sub     x0, x0, #176
    stp     x1, x2, [x0, #0]        /* x19 = arg, x20 = main */
    stp     x3, xzr, [x0, #16]      /* x21 = exit, x22 */
    stp     xzr, xzr, [x0, #32]     /* x23, x24 */
    stp     xzr, xzr, [x0, #48]     /* x25, x26 */
    stp     xzr, xzr, [x0, #64]     /* x27, x28 */
    adr     x9, caller__fiber_trampoline
    stp     xzr, x9, [x0, #80]      /* x29 = 0 ends frame chains; x30 */
    stp     xzr, xzr, [x0, #96]     /* d8-d15 = 0.0 */
    stp     xzr, xzr, [x0, #112]
    stp     xzr, xzr, [x0, #128]
    stp     xzr, xzr, [x0, #144]
    mrs     x9, fpcr
    stp     x9, xzr, [x0, #160]
    ret
    .cfi_endproc
    .size   caller__fiber_asm_init, .-caller__fiber_asm_init

/*
 * void caller__fiber_asm_switch(void **save_sp, void *sp);
 *
 * x0 = save_sp, x1 = sp. Saves the current context, stores its stack pointer
 * in *save_sp and resumes the context whose stack pointer is sp. Returns
 * when some later switch resumes the saved context. Uses only x9 and x10 as
 * scratch (caller-saved, like x0 and x1).
 */
    .globl  caller__fiber_asm_switch
    .hidden caller__fiber_asm_switch
    .type   caller__fiber_asm_switch, %function
    .p2align 4
caller__fiber_asm_switch:
    .cfi_startproc
    sub     sp, sp, #176
    .cfi_def_cfa_offset 176
    stp     x19, x20, [sp, #0]
    stp     x21, x22, [sp, #16]
    stp     x23, x24, [sp, #32]
    stp     x25, x26, [sp, #48]
    stp     x27, x28, [sp, #64]
    stp     x29, x30, [sp, #80]
    .cfi_offset x29, -96
    .cfi_offset x30, -88
    stp     d8, d9, [sp, #96]
    stp     d10, d11, [sp, #112]
    stp     d12, d13, [sp, #128]
    stp     d14, d15, [sp, #144]
    mrs     x9, fpcr
    str     x9, [sp, #160]

    mov     x10, sp
    str     x10, [x0]
    /* The other stack holds a frame of the same shape, so the CFI above
     * stays right from here on. */
    mov     sp, x1

    /* Writing FPCR can be slow on some cores; most switches keep it. */
    ldr     x10, [sp, #160]
    cmp     x9, x10
    b.eq    1f
    msr     fpcr, x10
1:
    ldp     d14, d15, [sp, #144]
    ldp     d12, d13, [sp, #128]
    ldp     d10, d11, [sp, #112]
    ldp     d8, d9, [sp, #96]
    ldp     x29, x30, [sp, #80]
    ldp     x27, x28, [sp, #64]
    ldp     x25, x26, [sp, #48]
    ldp     x23, x24, [sp, #32]
    ldp     x21, x22, [sp, #16]
    ldp     x19, x20, [sp, #0]
    add     sp, sp, #176
    .cfi_def_cfa_offset 0
    .cfi_restore x29
    .cfi_restore x30
    ret
    .cfi_endproc
    .size   caller__fiber_asm_switch, .-caller__fiber_asm_switch

/*
 * First code of every fiber, entered by the ret of the first switch with
 * sp a multiple of 16. x19 is callee-saved, so it still holds arg when main
 * returns.
 */
    .type   caller__fiber_trampoline, %function
    .p2align 4
caller__fiber_trampoline:
    .cfi_startproc
    /* The outermost frame of the fiber: unwinders and debuggers stop here. */
    .cfi_undefined x30
    mov     x0, x19
    blr     x20
    mov     x0, x19
    blr     x21
    brk     #0x3e8                  /* exit never returns */
    .cfi_endproc
    .size   caller__fiber_trampoline, .-caller__fiber_trampoline

#endif /* __aarch64__ && !CALLER_FIBER_UCONTEXT */

/*
 * Outside the #if on purpose: an object without this note makes GNU ld mark
 * the whole library as needing an executable stack, and on the other
 * architectures this file still yields an (otherwise empty) object.
 */
#if defined(__linux__) && defined(__ELF__)
    .section .note.GNU-stack, "", %progbits
#endif
