/*
 * Intrusive lists: a node lives in the object it links, so linking never
 * allocates. A doubly-linked circular list with a head node (O(1) removal
 * from anywhere), and container_of to get back from the node.
 */
#ifndef CALLER_LIST_H
#define CALLER_LIST_H

#include <stdbool.h>
#include <stddef.h>

#define caller__container_of(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))

typedef struct caller__link {
    struct caller__link *prev, *next;
} caller__link_t;

/* An empty list (or an unlinked node: linked to itself). */
static inline void caller__list_init(caller__link_t *head)
{
    head->prev = head->next = head;
}

static inline bool caller__list_empty(const caller__link_t *head)
{
    return head->next == head;
}

/* Link @p l at the end of @p head's list. */
static inline void caller__list_add_tail(caller__link_t *head, caller__link_t *l)
{
    l->next = head;
    l->prev = head->prev;
    head->prev->next = l;
    head->prev = l;
}

/* Unlink @p l from its list (it is left unlinked: linked to itself). */
static inline void caller__list_del(caller__link_t *l)
{
    l->prev->next = l->next;
    l->next->prev = l->prev;
    caller__list_init(l);
}

/* Move every node of @p from to the end of @p to; @p from is left empty. */
static inline void caller__list_splice_tail_init(caller__link_t *to, caller__link_t *from)
{
    if (caller__list_empty(from))
        return;
    from->next->prev = to->prev;
    to->prev->next = from->next;
    from->prev->next = to;
    to->prev = from->prev;
    caller__list_init(from);
}

/* for (each node @p pos of @p head's list): @p pos is declared here; the
 * body must not unlink it. */
#define caller__list_for_each(pos, head)                                                           \
    for (caller__link_t *pos = (head)->next; pos != (head); pos = pos->next)

#endif /* CALLER_LIST_H */
