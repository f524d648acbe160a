/*
 * What go-dqlite v3 (microcluster v3's binding) needs from libdqlite beyond
 * Debian's 1.11.1, for microd and microctl only; build.sh links it as an
 * archive ahead of -ldqlite. Everything else go-dqlite v3 calls is in 1.11.1,
 * or declared weak by go-dqlite itself (auto-recovery, snapshot parameters v2,
 * disk mode, busy timeout: it checks for NULL and errs only when asked for a
 * non-default, which microcluster never asks for).
 */
/* Found through -I include, so its #include_next reaches Debian's header. */
#include <dqlite.h>

/*
 * go-dqlite v3.0.4's NewNode refuses a library that reports less than 1.17.0
 * (bindings.DqliteMinSupportedVersion); that gate is the only use go-dqlite or
 * microcluster makes of the number. Defined in the executable, this one wins
 * over libdqlite's for the whole process. The library underneath is still
 * 1.11.1: the two functions below are what it does not have.
 */
int dqlite_version_number(void)
{
	return 11700;
}

/*
 * The Raft block size for disk I/O; go-dqlite calls this only for a non-zero
 * WithBlockSize, which microcluster does not set.
 */
int dqlite_node_set_block_size(dqlite_node *n, size_t size)
{
	(void)n;
	(void)size;
	return DQLITE_ERROR;
}

/*
 * The last Raft entry of a stopped node, for go-dqlite's ReadLastEntryInfo
 * (choosing the node to recover from offline); microcluster's recovery does
 * not call it. An error, never a made-up index and term.
 */
int dqlite_node_describe_last_entry(dqlite_node *n, uint64_t *index, uint64_t *term)
{
	(void)n;
	(void)index;
	(void)term;
	return DQLITE_ERROR;
}
