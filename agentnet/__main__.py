from agentnet.cli import main

main()
