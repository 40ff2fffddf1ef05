"""What the encoder learned: k-NN and linear probes on labelled shards."""
