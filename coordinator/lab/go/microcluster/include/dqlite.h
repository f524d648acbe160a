/*
 * Debian's <dqlite.h> (libdqlite 1.11.1) plus the two functions go-dqlite v3's
 * bindings call unconditionally but 1.11.1 lacks; cgo refuses a call it has no
 * declaration for. build.sh puts this directory first on microd's and
 * microctl's include path, and dqlite_compat.c defines both.
 */
#ifndef MEMBERGUARD_DQLITE_COMPAT_H
#define MEMBERGUARD_DQLITE_COMPAT_H

#include_next <dqlite.h>

#if DQLITE_VERSION_NUMBER < 11700
int dqlite_node_set_block_size(dqlite_node *n, size_t size);
int dqlite_node_describe_last_entry(dqlite_node *n, uint64_t *index, uint64_t *term);
#endif

#endif
