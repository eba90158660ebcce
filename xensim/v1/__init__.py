"""The xensim.v1 wire contract, generated from proto/xensim/v1 by scripts/gen_proto.py."""
