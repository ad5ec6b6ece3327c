from qft.cli.main import main

main()
