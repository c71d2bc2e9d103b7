/*
 * Every private header of src/, for the tests and benchmarks that look
 * inside the library. The library's own files include only the headers of
 * what they use (each header says which file it belongs to).
 */
#ifndef CALLER_INTERNAL_H
#define CALLER_INTERNAL_H

#include "alloc.h"
#include "context.h"
#include "core.h"
#include "error.h"
#include "fiber.h"
#include "inbox.h"
#include "iopub.h"
#include "list.h"
#include "lockorder.h"
#include "pending.h"
#include "sync.h"
#include "task.h"

#endif /* CALLER_INTERNAL_H */
