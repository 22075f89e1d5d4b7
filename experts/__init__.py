"""What an expert is and where it lives: the in-memory registry the server reads, expert files on
disk, and (later) pass-1 strategies and training. Tensor math stays in ``adapters``; HTTP stays in
``server``. Never unpickles uploaded bytes.
"""
