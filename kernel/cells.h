/*
 * What a cell of caller-kernel can say: one command per line.
 *
 *   %callers                         the callers table (caller_print_table)
 *   %sleep S                         suspend the cell's task for S seconds
 *   %example [jobs=N] [seconds=S]    the seed's example (cells.c)
 *
 * Blank lines are skipped; anything else is an error.
 */
#ifndef CALLER_KERNEL_CELLS_H
#define CALLER_KERNEL_CELLS_H

#include "wire.h"

#include <caller.h>

typedef struct kcell {
    kwire_msg_t parent; /* only .header is set: the execute_request's, owned */
    char *code;         /* owned */
    unsigned long seq;  /* unique per cell run, for display ids */
    caller_t *shell;    /* borrowed: the Shell outlives every cell */
    /* Filled when the cell fails (the task then raises). */
    char ename[64];
    char evalue[512];
} kcell_t;

/** A new cell for @p code, answering @p request. NULL on -ENOMEM. */
kcell_t *kcell_new(const kwire_msg_t *request, const char *code, caller_t *shell);

/** Free a cell: a finalizer for caller_pending_set_userdata(). */
void kcell_free(void *cell);

/** The cell's task (caller_call_soon onto the Shell). Returns NULL; on
 *  failure fills ename/evalue and calls caller_raise(). */
void *kcell_run(void *cell);

/** The magic commands starting with @p prefix, as a JSON array (for
 *  complete_request). */
json_t *kcell_complete(const char *prefix);

#endif
