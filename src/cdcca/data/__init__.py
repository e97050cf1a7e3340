"""Data: easy-VQA and users' own VQA rows, image corruptions, and the continual shift stream."""
