from imagestream.cli.main import main

main()
