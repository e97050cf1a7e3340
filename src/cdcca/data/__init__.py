"""Data: easy-VQA and users' own VQA rows, image corruptions, the continual shift stream, and the
on-disk cache of the frozen encoder's tokens for those image sets (``features``)."""
