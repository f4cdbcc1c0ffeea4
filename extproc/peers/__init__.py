"""Active-active EPP replicas that share what they learn (docs/high-availability.md).

Each replica journals the prefix blocks its own picks record (`journal.SharedPrefixIndex`) and pushes
them, with its own in-flight load per endpoint, to every peer over a small versioned gRPC stream
(`sync.PeerSync`, protos/extproc/peers/peerpb/peer.proto); peers come from a static list or the EPP's
headless Service (`discovery`). What a peer says is applied to this replica's prefix index and
datastore (`load.PeerLoad`), so N replicas route like one.
"""
