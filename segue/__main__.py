from segue.cli import main

# Guarded: engines that start helper processes with "spawn" (vLLM) re-import this module.
if __name__ == "__main__":
    main()
