"""Default schedules shared by the loss modules and the command line, kept free of torch so ``safeshape train
--help`` stays light."""

# Deep Token's beta for positions 1, 2, ..., the last for every later position (docs/math.md#deep-token; the
# authors' beta 0.1, first-token factor 5, factor 20 up to position 5)
DEEP_TOKEN_BETAS = (0.5, 2.0, 2.0, 2.0, 2.0, 0.1)
