/*
 * The fiber context switch for x86_64, System V ABI (see src/fiber.h).
 *
 * A suspended context is just a stack pointer: the switch pushes what the
 * ABI says a callee must preserve (rbx, rbp, r12-r15, the MXCSR control bits
 * and the x87 control word) on the current stack, stores rsp, loads the
 * other context's rsp and pops the same things from there. Caller-saved
 * registers need no saving: the C compiler already treats the switch as an
 * ordinary call that clobbers them.
 *
 * Saved frame, from the saved rsp upwards (64 bytes, then the return
 * address):
 *     0  MXCSR (4 bytes), x87 control word (2 bytes), 2 unused
 *     8  r15     16  r14     24  r13     32  r12     40  rbx     48  rbp
 *    56  return address
 *
 * A new fiber gets the same frame, built by caller__fiber_asm_init, whose
 * return address is the trampoline. The trampoline calls main(arg) and then
 * exit(arg), which switches away for good; neither returns into it.
 *
 * The whole file assembles to nothing on other architectures and in the
 * ucontext build (CMake builds every .S file of src/ everywhere), except the
 * .note.GNU-stack at the end.
 */
#if defined(__x86_64__) && defined(__LP64__) &&                                                   \
    !(defined(CALLER_FIBER_UCONTEXT) && CALLER_FIBER_UCONTEXT)

    .text

/*
 * void *caller__fiber_asm_init(void *top, void *arg,
 *                              void (*main)(void *), void (*exit)(void *));
 *
 * Builds a new fiber's first frame just below top (rounded down to 16
 * bytes) and returns the stack pointer to switch to. The fiber starts with
 * the caller's MXCSR and x87 control word.
 */
    .globl  caller__fiber_asm_init
    .hidden caller__fiber_asm_init
    .type   caller__fiber_asm_init, @function
    .p2align 4
caller__fiber_asm_init:
    .cfi_startproc
    andq    $-16, %rdi
    /* top - 80: the 64-byte frame, the return address (top - 24) and
     * 16 bytes above it, so that the trampoline starts with rsp = top - 16,
     * a multiple of 16 as a call instruction needs. */
    leaq    -80(%rdi), %rax
    stmxcsr (%rax)
    fnstcw  4(%rax)
    movw    $0, 6(%rax)
    movq    $0, 8(%rax)             /* r15 */
    movq    %rcx, 16(%rax)          /* r14 = exit */
    movq    %rdx, 24(%rax)          /* r13 = main */
    movq    %rsi, 32(%rax)          /* r12 = arg */
    movq    $0, 40(%rax)            /* rbx */
    movq    $0, 48(%rax)            /* rbp = 0 ends frame-pointer chains */
    leaq    caller__fiber_trampoline(%rip), %rcx
    movq    %rcx, 56(%rax)
    movq    $0, 64(%rax)            /* no return address above the trampoline */
    movq    $0, 72(%rax)
    ret
    .cfi_endproc
    .size   caller__fiber_asm_init, .-caller__fiber_asm_init

/*
 * void caller__fiber_asm_switch(void **save_sp, void *sp);
 *
 * Saves the current context, stores its stack pointer in *save_sp and
 * resumes the context whose stack pointer is sp. Returns when some later
 * switch resumes the saved context.
 */
    .globl  caller__fiber_asm_switch
    .hidden caller__fiber_asm_switch
    .type   caller__fiber_asm_switch, @function
    .p2align 4
caller__fiber_asm_switch:
    .cfi_startproc
    pushq   %rbp
    .cfi_adjust_cfa_offset 8
    .cfi_rel_offset %rbp, 0
    pushq   %rbx
    .cfi_adjust_cfa_offset 8
    .cfi_rel_offset %rbx, 0
    pushq   %r12
    .cfi_adjust_cfa_offset 8
    .cfi_rel_offset %r12, 0
    pushq   %r13
    .cfi_adjust_cfa_offset 8
    .cfi_rel_offset %r13, 0
    pushq   %r14
    .cfi_adjust_cfa_offset 8
    .cfi_rel_offset %r14, 0
    pushq   %r15
    .cfi_adjust_cfa_offset 8
    .cfi_rel_offset %r15, 0
    subq    $8, %rsp
    .cfi_adjust_cfa_offset 8
    stmxcsr (%rsp)
    fnstcw  4(%rsp)

    movq    %rsp, (%rdi)
    /* The other stack holds a frame of the same shape, so the CFI above
     * stays right from here on. */
    movq    %rsi, %rsp

    ldmxcsr (%rsp)
    fldcw   4(%rsp)
    addq    $8, %rsp
    .cfi_adjust_cfa_offset -8
    popq    %r15
    .cfi_adjust_cfa_offset -8
    .cfi_restore %r15
    popq    %r14
    .cfi_adjust_cfa_offset -8
    .cfi_restore %r14
    popq    %r13
    .cfi_adjust_cfa_offset -8
    .cfi_restore %r13
    popq    %r12
    .cfi_adjust_cfa_offset -8
    .cfi_restore %r12
    popq    %rbx
    .cfi_adjust_cfa_offset -8
    .cfi_restore %rbx
    popq    %rbp
    .cfi_adjust_cfa_offset -8
    .cfi_restore %rbp
    ret
    .cfi_endproc
    .size   caller__fiber_asm_switch, .-caller__fiber_asm_switch

/*
 * First code of every fiber, entered by the ret of the first switch with
 * r12 = arg, r13 = main, r14 = exit and rsp a multiple of 16. r12 is
 * callee-saved, so it still holds arg when main returns.
 */
    .type   caller__fiber_trampoline, @function
    .p2align 4
caller__fiber_trampoline:
    .cfi_startproc
    /* The outermost frame of the fiber: unwinders and debuggers stop here. */
    .cfi_undefined %rip
    movq    %r12, %rdi
    callq   *%r13
    movq    %r12, %rdi
    callq   *%r14
    ud2                             /* exit never returns */
    .cfi_endproc
    .size   caller__fiber_trampoline, .-caller__fiber_trampoline

#endif /* __x86_64__ && !CALLER_FIBER_UCONTEXT */

/*
 * Outside the #if on purpose: an object without this note makes GNU ld mark
 * the whole library as needing an executable stack, and on the other
 * architectures this file still yields an (otherwise empty) object.
 */
#if defined(__linux__) && defined(__ELF__)
    .section .note.GNU-stack, "", %progbits
#endif
