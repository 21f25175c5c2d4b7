from aotc.cli import main

main()
