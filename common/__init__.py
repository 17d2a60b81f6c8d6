"""Bottom layer of facefed: primitives shared by sites and server (GF(256) Shamir, LFW, model,
accounting, evaluation). Imports neither `client` nor `server`."""
